"""Thin HTTP handlers: validate, build the prompts, call the coordinator, pick the response.

Validation happens in app/protocol.py (types, ranges, `check(settings)`), admission (API keys,
the concurrency limit) in app/main.py's middleware, generation in app/coordinator.py, SSE in
app/streaming.py. Errors are raised as app/errors.py exceptions; app/main.py renders them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from app import protocol, streaming
from app.coordinator import (
    ChatMessage,
    Completion,
    DualPrompt,
    Event,
    GenerationParams,
)
from app.errors import UPSTREAM_UNAVAILABLE, ModelNotFoundError, error_body
from app.settings import Settings
from app.streaming import TokenTexts

log = logging.getLogger(__name__)

T = TypeVar("T")

# The endpoint label of the metrics (app/metrics.py ENDPOINTS), by path.
ENDPOINTS: dict[str, str] = {
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat_completions",
}


class Backend(Protocol):
    """What the handlers need of app.coordinator.Coordinator (tests may pass a stand-in)."""

    @property
    def token_texts(self) -> TokenTexts:
        """Token id -> text for `logprobs` (app.pair.TokenTextCache)."""

    async def ready(self) -> bool: ...

    async def completion_prompts(
        self,
        prompt: str | list[int] | list[str] | list[list[int]],
        base_prompt: str | list[int] | list[str] | list[list[int]] | None = None,
    ) -> list[DualPrompt]: ...

    async def chat_prompt(
        self,
        messages: Sequence[ChatMessage],
        base_messages: Sequence[ChatMessage] | None = None,
        base_prompt: str | list[int] | None = None,
    ) -> DualPrompt: ...

    def stream(
        self, prompts: Sequence[DualPrompt], params: GenerationParams
    ) -> AsyncIterator[Event]: ...

    async def generate(
        self, prompts: Sequence[DualPrompt], params: GenerationParams
    ) -> list[Completion]: ...


class HTTPObserver(Protocol):
    """The metrics hooks of the HTTP layer (app.metrics.Metrics)."""

    def request_started(self, endpoint: str) -> None: ...

    def request_finished(self, endpoint: str, outcome: str, seconds: float) -> None: ...

    def time_to_first_token(self, seconds: float) -> None: ...

    def inter_token_latency(self, seconds: float) -> None: ...

    def render(self) -> tuple[bytes, str]: ...


@dataclass(slots=True)
class Gateway:
    """Everything the handlers share; built by app/main.py's lifespan (app.state.gateway)."""

    settings: Settings
    backend: Backend
    metrics: HTTPObserver

    @property
    def token_texts(self) -> TokenTexts:
        return self.backend.token_texts


def gateway(request: Request) -> Gateway:
    state: Gateway = request.app.state.gateway
    return state


def set_outcome(request: Request, outcome: str) -> None:
    """Tell the admission middleware how the request ended (a stream's 200 may end badly)."""
    request.scope.setdefault("state", {})["outcome"] = outcome


def check_model(model: str | None, settings: Settings) -> None:
    # Only the gateway's own name: accepting an upstream's name would suggest that model alone
    # answers. An absent/empty model is accepted, like vLLM (reference §1).
    if model and model != settings.model_name:
        raise ModelNotFoundError(
            f"The model `{model}` does not exist; this gateway serves `{settings.model_name}`.",
            param="model",
        )


async def until_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """Run `work`; if the client goes away first, cancel it (and its upstream calls)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        set_outcome(request, "cancelled")
        return None
    finally:
        for pending in (task, watcher):
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pending


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> Response:
    if await gateway(request).backend.ready():
        return JSONResponse({"status": "ready"})
    return JSONResponse(
        error_body("an upstream does not answer", UPSTREAM_UNAVAILABLE), status_code=503
    )


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    body, content_type = gateway(request).metrics.render()
    return Response(body, media_type=content_type)


@router.get("/v1/models")
async def models(request: Request) -> Response:
    settings = gateway(request).settings
    return _json(protocol.ModelList(data=[protocol.ModelCard(id=settings.model_name)]))


@router.post("/v1/completions")
async def create_completion(body: protocol.CompletionRequest, request: Request) -> Response:
    state = gateway(request)
    check_model(body.model, state.settings)
    body.check(state.settings)
    params = body.generation_params(state.settings)
    prompts = await state.backend.completion_prompts(body.prompt, body.base_prompt)
    return await _respond("completions", body, prompts, params, request)


@router.post("/v1/chat/completions")
async def create_chat_completion(
    body: protocol.ChatCompletionRequest, request: Request
) -> Response:
    state = gateway(request)
    check_model(body.model, state.settings)
    body.check(state.settings)
    params = body.generation_params(state.settings)
    prompt = await state.backend.chat_prompt(
        body.chat_messages(), body.base_chat_messages(), body.base_prompt
    )
    return await _respond("chat", body, [prompt], params, request)


async def _respond(
    kind: Literal["completions", "chat"],
    body: protocol.CompletionRequest | protocol.ChatCompletionRequest,
    prompts: list[DualPrompt],
    params: GenerationParams,
    request: Request,
) -> Response:
    state = gateway(request)
    model = state.settings.model_name
    diagnostics = body.diagnostics(state.settings)
    as_ids = bool(body.return_tokens_as_token_ids)
    if body.stream:
        started = time.perf_counter()
        renderer = streaming.StreamRenderer(
            kind=kind,
            model=model,
            n=params.n,
            logprobs=params.logprobs,
            token_ids_as_strings=as_ids,
            diagnostics=diagnostics,
            include_usage=body.include_usage,
            return_token_ids=bool(body.return_token_ids),
        )
        frames = streaming.event_frames(
            state.backend.stream(prompts, params),
            renderer,
            token_texts=state.token_texts,
            observer=state.metrics,
            started=started,
            set_outcome=lambda outcome: set_outcome(request, outcome),
        )
        # The first frame is awaited before the 200 goes out, so an upstream that fails at
        # once still gets its own status (503, 504, ...) instead of an error frame.
        first = await until_disconnect(request, anext(frames))
        if first is None:
            await frames.aclose()
            return Response(status_code=499)
        return StreamingResponse(
            streaming.with_keepalive(
                streaming.prepend(first, frames), state.settings.stream_keepalive_seconds
            ),
            media_type="text/event-stream",
            headers=streaming.SSE_HEADERS,
        )

    completions = await until_disconnect(request, state.backend.generate(prompts, params))
    if completions is None:
        return Response(status_code=499)  # nobody is listening; the status is for the logs
    texts: Mapping[int, str] | None = None
    if params.logprobs is not None:
        ids = {i for c in completions for i in _listed_ids(c, params.logprobs)}
        texts = await state.token_texts(sorted(ids))
    prompt_tokens = {c.prompt_index: c.prompt_tokens for c in completions}
    usage = protocol.usage(prompt_tokens, sum(c.completion_tokens for c in completions))
    if kind == "completions":
        return _json(
            protocol.CompletionResponse(
                model=model,
                choices=[
                    protocol.CompletionResponseChoice(
                        index=c.index,
                        text=c.text,
                        logprobs=_completion_logprobs(c, texts, as_ids, params.logprobs),
                        finish_reason=c.finish_reason,
                        **_extras(c, body, diagnostics),
                    )
                    for c in completions
                ],
                usage=usage,
            )
        )
    return _json(
        protocol.ChatCompletionResponse(
            model=model,
            choices=[
                protocol.ChatCompletionResponseChoice(
                    index=c.index,
                    message=protocol.ChatMessage(content=c.text),
                    logprobs=_chat_logprobs(c, texts, as_ids, params.logprobs),
                    finish_reason=c.finish_reason,
                    **_extras(c, body, diagnostics),
                )
                for c in completions
            ],
            usage=usage,
        )
    )


def _extras(
    completion: Completion,
    body: protocol.CompletionRequest | protocol.ChatCompletionRequest,
    diagnostics: bool,
) -> dict[str, Any]:
    extra: dict[str, Any] = {"stop_reason": completion.stop_reason}
    if body.return_token_ids:
        extra["token_ids"] = completion.token_ids
    if diagnostics:
        extra["diagnostics"] = protocol.diagnostics(completion.steps, summary=True)
    return extra


def _listed_ids(completion: Completion, n: int) -> list[int]:
    """The ids whose text `logprobs` shows: each token and its top-n alternatives."""
    tops = _tops(completion)
    return [
        listed
        for position, token_id in enumerate(completion.token_ids)
        for listed, _ in protocol.ranked_logprobs(
            token_id, completion.steps[position].logprob, tops[position]
        )[: n + 1]
    ]


def _tops(completion: Completion) -> list[dict[int, float] | None]:
    """One top-N dict (or None) per token id, whatever the coordinator recorded."""
    tops: list[dict[int, float] | None] = list(completion.top_logprobs or [])
    return (tops + [None] * len(completion.token_ids))[: len(completion.token_ids)]


def _completion_logprobs(
    completion: Completion, texts: Mapping[int, str] | None, as_ids: bool, n: int | None
) -> protocol.CompletionLogProbs | None:
    if n is None:
        return None
    offsets, offset = [], 0
    for token_id in completion.token_ids:
        offsets.append(offset)
        offset += len(protocol.token_string(token_id, texts))
    return protocol.completion_logprobs(
        completion.token_ids,
        [s.logprob for s in completion.steps],
        _tops(completion),
        offsets,
        None if as_ids else texts,
        n,
    )


def _chat_logprobs(
    completion: Completion, texts: Mapping[int, str] | None, as_ids: bool, n: int | None
) -> protocol.ChatCompletionLogProbs | None:
    if n is None:
        return None
    return protocol.chat_logprobs(
        completion.token_ids,
        [s.logprob for s in completion.steps],
        _tops(completion),
        None if as_ids else texts,
        n,
    )
