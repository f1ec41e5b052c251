"""Thin HTTP handlers: validate, check, build the prompts, generate, render.

Each generation handler: the wire shapes (app/protocol, pydantic), the checks against the
settings (the backend's `check`, app/plan.py) and the wire-only checks (the request's
`check()`), all before any prompt is tokenized; then the prompts (the backend tokenizes) and
`_respond` with the response family's renderer (app/render), picked once by the handler, as a
JSON body or an SSE stream (app/streaming.py).
Admission (API keys, the concurrency limit) is app/main.py's middleware; errors are raised as
app/errors.py exceptions and app/main.py renders them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from app import protocol, streaming
from app.errors import UPSTREAM_UNAVAILABLE, ModelNotFoundError, error_body
from app.generation import (
    ChatMessage,
    ChatTemplate,
    Completion,
    DualPrompt,
    Event,
    GenerationParams,
)
from app.inputcheck import check_values
from app.lifecycle import Lifecycle, cut_frames
from app.render import ChatRenderer, CompletionRenderer, Renderer, RenderOptions
from app.settings import Settings
from app.streaming import TokenTexts
from app.upstream import ModelInfo

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

    @property
    def models(self) -> Mapping[str, ModelInfo]:
        """The upstreams' model info by role ("base", "teacher")."""

    def check(self, params: GenerationParams, prompts: int) -> None:
        """The request-level checks (app/plan.py `check_request`); raises
        InvalidRequestError before any upstream call."""

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
        template: ChatTemplate | None = None,
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
    lifecycle: Lifecycle = field(default_factory=Lifecycle)

    @property
    def token_texts(self) -> TokenTexts:
        return self.backend.token_texts


def gateway(request: Request) -> Gateway:
    state: Gateway = request.app.state.gateway
    return state


# Where a request's outcome travels back to app/main.py's AdmissionMiddleware (the request
# metrics' `outcome` label): the ASGI scope's "state", shared by the middleware and the request.
OUTCOME_KEY = "outcome"


def set_outcome(request: Request, outcome: str) -> None:
    """Tell the admission middleware how the request ended, when its status alone does not say
    (a stream's 200 may end in an error frame; a 499 is "cancelled"). Without it the
    middleware derives the outcome from the status (app/main.py `_outcome`)."""
    request.scope.setdefault("state", {})[OUTCOME_KEY] = outcome


def check_model(model: str | None, settings: Settings) -> None:
    # Only the gateway's own name: accepting an upstream's name would suggest that model alone
    # answers. An absent/empty model is accepted, like vLLM (docs/VLLM_API.md).
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
    """200 while serving with a healthy replica of each model; 503 while starting, draining,
    or when a model has no replica answering."""
    state = gateway(request)
    refusal = state.lifecycle.refusal()
    if refusal is not None:
        message, kind = refusal
        return JSONResponse(error_body(message, kind), status_code=503)
    if await state.backend.ready():
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
    state = gateway(request)
    name = state.settings.model_name
    limit = min(info.max_model_len for info in state.backend.models.values())
    card = protocol.ModelCard(id=name, root=name, max_model_len=limit)
    return _json(protocol.ModelList(data=[card]))


@router.post("/v1/completions")
async def create_completion(body: protocol.CompletionRequest, request: Request) -> Response:
    state = gateway(request)
    check_values(body)  # lone surrogates, integers beyond 64 bits: 400, not a later 500
    check_model(body.model, state.settings)
    params = body.generation_params(state.settings)
    # The settings' checks first (they came first before they moved to app/plan.py, so a
    # request with several problems still names the same one), and before any tokenizing.
    state.backend.check(params, protocol.prompt_count(body.prompt))
    body.check()
    prompts = await state.backend.completion_prompts(body.prompt, body.base_prompt)
    return await _respond(CompletionRenderer, body, prompts, params, request)


@router.post("/v1/chat/completions")
async def create_chat_completion(
    body: protocol.ChatCompletionRequest, request: Request
) -> Response:
    state = gateway(request)
    check_values(body)
    check_model(body.model, state.settings)
    params = body.generation_params(state.settings)
    state.backend.check(params, 1)  # first, as for completions
    body.check()
    prompt = await state.backend.chat_prompt(
        body.chat_messages(), body.base_chat_messages(), body.base_prompt, body.chat_template()
    )
    return await _respond(ChatRenderer, body, [prompt], params, request)


async def _respond(
    family: type[Renderer],
    body: protocol.CompletionRequest | protocol.ChatCompletionRequest,
    prompts: list[DualPrompt],
    params: GenerationParams,
    request: Request,
) -> Response:
    """Generate and answer: a body, or an SSE stream (each rendered by `family`)."""
    state = gateway(request)
    options = RenderOptions.of(body, state.settings, params)
    if body.stream:
        return await _stream(family(options), prompts, params, request)
    completions = await until_disconnect(request, state.backend.generate(prompts, params))
    if completions is None:
        return Response(status_code=499)  # nobody is listening; the status is for the logs
    renderer = family(options)  # built now: `created` is when the body was made
    texts = await _token_texts(state, renderer.completions_text_ids(completions))
    return _json(renderer.body(completions, texts))


async def _stream(
    renderer: Renderer, prompts: list[DualPrompt], params: GenerationParams, request: Request
) -> Response:
    state = gateway(request)
    started = time.perf_counter()
    frames = streaming.event_frames(
        state.backend.stream(prompts, params),
        renderer,
        token_texts=state.token_texts,
        observer=state.metrics,
        started=started,
        set_outcome=functools.partial(set_outcome, request),
    )
    # The first frame is awaited before the 200 goes out, so an upstream that fails at once
    # still gets its own status (503, 504, ...) instead of an error frame.
    first = await until_disconnect(request, anext(frames))
    if first is None:
        await frames.aclose()
        return Response(status_code=499)
    return StreamingResponse(
        streaming.with_keepalive(
            streaming.prepend(first, frames),
            state.settings.stream_keepalive_seconds,
            cut=state.lifecycle.cut,
            on_cut=functools.partial(cut_frames, functools.partial(set_outcome, request)),
        ),
        media_type="text/event-stream",
        headers=streaming.SSE_HEADERS,
    )


async def _token_texts(state: Gateway, ids: list[int] | None) -> Mapping[int, str] | None:
    """The texts of `ids` (None when the response shows no token strings)."""
    if ids is None:
        return None
    return await state.token_texts(ids)
