"""Coordinator events -> OpenAI server-sent events (../shared/reference/vllm-api.md §2.6).

Framing: each event is `data: <json>\\n\\n`; the stream ends with `data: [DONE]\\n\\n`. An error
after the stream has started goes out as ONE `data: {"error": ...}` frame (the body of
app/errors.py's table, the same as the JSON error responses) followed by `data: [DONE]`; the
OpenAI client raises `APIError` on it. While no event is ready, a comment line
(`: keep-alive`) goes out every `Settings.stream_keepalive_seconds` so proxies keep the
connection open; SSE clients ignore comments.

Chunks: completions send one chunk per generated token (its text delta, which may be "" while
text is held back, its logprobs and diagnostics), then one chunk with the finish reason and
the flushed text. Chat sends the assistant role in the first chunk of each choice. With
`stream_options.include_usage` a last chunk with `choices: []` and the usage precedes [DONE].
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel

from app import protocol
from app.coordinator import Event, FinishEvent, TokenEvent
from app.errors import INTERNAL, DualVLLMError, error_body, error_body_for
from app.sampling.types import StepResult

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

TokenTexts = Callable[[Sequence[int]], Awaitable[Mapping[int, str]]]


class StreamObserver(Protocol):
    """The metrics hooks the stream reports to (app.metrics.Metrics has them)."""

    def time_to_first_token(self, seconds: float) -> None: ...

    def inter_token_latency(self, seconds: float) -> None: ...


def frame(payload: BaseModel | Mapping[str, Any]) -> bytes:
    if isinstance(payload, BaseModel):
        text = payload.model_dump_json()
    else:
        text = json.dumps(payload, separators=(",", ":"))
    return b"data: " + text.encode("utf-8") + b"\n\n"


def error_frame(exc: BaseException) -> bytes:
    if isinstance(exc, DualVLLMError):
        return frame(error_body_for(exc))
    return frame(error_body("internal server error", INTERNAL))


@dataclass(slots=True)
class _Choice:
    steps: list[StepResult] = field(default_factory=list)  # kept only with diagnostics
    offset: int = 0  # text_offset of the next token (sum of the token strings so far)
    last_token_at: float | None = None
    role_sent: bool = False


@dataclass(slots=True)
class StreamRenderer:
    """Turns one request's events into chunk frames (completions or chat)."""

    kind: Literal["completions", "chat"]
    model: str
    n: int
    logprobs: int | None  # top-N of q, None = off
    token_ids_as_strings: bool  # return_tokens_as_token_ids: "token_id:N" instead of text
    diagnostics: bool
    include_usage: bool
    return_token_ids: bool
    request_id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    choices: dict[int, _Choice] = field(default_factory=dict)
    prompt_tokens: dict[int, int] = field(default_factory=dict)
    completion_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.request_id:
            prefix = "cmpl" if self.kind == "completions" else "chatcmpl"
            self.request_id = f"{prefix}-{uuid.uuid4().hex}"

    def choice(self, index: int) -> _Choice:
        return self.choices.setdefault(index, _Choice())

    def token(self, event: TokenEvent, texts: Mapping[int, str] | None) -> bytes:
        state = self.choice(event.index)
        if self.diagnostics:  # only the finish chunk's summary reads them
            state.steps.append(event.step)
        extra: dict[str, Any] = {}
        if self.return_token_ids:
            extra["token_ids"] = [event.token_id]
        if self.diagnostics:
            extra["diagnostics"] = protocol.diagnostics([event.step], summary=False)
        names = None if self.token_ids_as_strings else texts
        if self.kind == "completions":
            logprobs = None
            if self.logprobs is not None:
                logprobs = protocol.completion_logprobs(
                    [event.token_id],
                    [event.step.logprob],
                    [event.top_logprobs],
                    [state.offset],
                    names,
                    self.logprobs,
                )
                state.offset += len(protocol.token_string(event.token_id, texts))
            return self._completion_chunk(event.index, event.text, logprobs, None, extra)
        chat_logprobs = None
        if self.logprobs is not None:
            chat_logprobs = protocol.chat_logprobs(
                [event.token_id], [event.step.logprob], [event.top_logprobs], names, self.logprobs
            )
        return self._chat_chunk(event.index, event.text, chat_logprobs, None, extra)

    def _completion_chunk(
        self,
        index: int,
        text: str,
        logprobs: protocol.CompletionLogProbs | None,
        finish_reason: str | None,
        extra: dict[str, Any],
    ) -> bytes:
        return frame(
            protocol.CompletionStreamResponse(
                id=self.request_id,
                created=self.created,
                model=self.model,
                choices=[
                    protocol.CompletionResponseChoice(
                        index=index,
                        text=text,
                        logprobs=logprobs,
                        finish_reason=finish_reason,
                        **extra,
                    )
                ],
            )
        )

    def _chat_chunk(
        self,
        index: int,
        text: str,
        logprobs: protocol.ChatCompletionLogProbs | None,
        finish_reason: str | None,
        extra: dict[str, Any],
    ) -> bytes:
        state = self.choice(index)
        delta = protocol.DeltaMessage(content=text)
        if not state.role_sent:
            delta = protocol.DeltaMessage(role="assistant", content=text)
            state.role_sent = True
        return frame(
            protocol.ChatCompletionStreamResponse(
                id=self.request_id,
                created=self.created,
                model=self.model,
                choices=[
                    protocol.ChatCompletionResponseStreamChoice(
                        index=index,
                        delta=delta,
                        logprobs=logprobs,
                        finish_reason=finish_reason,
                        **extra,
                    )
                ],
            )
        )

    def finish(self, event: FinishEvent) -> bytes:
        state = self.choice(event.index)
        self.prompt_tokens[event.index // self.n] = event.prompt_tokens
        self.completion_tokens += event.completion_tokens
        extra: dict[str, Any] = {"stop_reason": event.stop_reason}
        if self.diagnostics:
            summary = protocol.diagnostics([], summary=False)
            summary.summary = protocol.summarize(state.steps)
            extra["diagnostics"] = summary
        if self.kind == "completions":
            return self._completion_chunk(event.index, event.text, None, event.finish_reason, extra)
        return self._chat_chunk(event.index, event.text, None, event.finish_reason, extra)

    def usage(self) -> bytes:
        usage = protocol.usage(self.prompt_tokens, self.completion_tokens)
        chunk: BaseModel
        if self.kind == "completions":
            chunk = protocol.CompletionStreamResponse(
                id=self.request_id, created=self.created, model=self.model, choices=[], usage=usage
            )
        else:
            chunk = protocol.ChatCompletionStreamResponse(
                id=self.request_id, created=self.created, model=self.model, choices=[], usage=usage
            )
        return frame(chunk)


Outcome = Callable[[str], None]


async def _aclose(iterator: AsyncIterator[Any]) -> None:
    """Close `iterator` if it is an async generator (cancelling the work behind it); a failure
    while closing must not replace the frames or the error already on their way."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


async def event_frames(
    events: AsyncIterator[Event],
    renderer: StreamRenderer,
    *,
    token_texts: TokenTexts | None,
    observer: StreamObserver | None,
    started: float,
    set_outcome: Outcome,
) -> AsyncGenerator[bytes, None]:
    """The frames of one request. An error before the first frame is raised (the route
    still can answer with a proper HTTP status); after it, it becomes an error frame."""
    sent = False
    first_token = True
    try:
        async for event in events:
            now = time.perf_counter()
            if isinstance(event, TokenEvent):
                state = renderer.choice(event.index)
                if observer is not None:
                    if first_token:
                        observer.time_to_first_token(now - started)
                    elif state.last_token_at is not None:
                        observer.inter_token_latency(now - state.last_token_at)
                first_token = False
                state.last_token_at = now
                texts = None
                if token_texts is not None and renderer.logprobs is not None:
                    ranked = protocol.ranked_logprobs(
                        event.token_id, event.step.logprob, event.top_logprobs
                    )
                    texts = await token_texts([i for i, _ in ranked[: renderer.logprobs + 1]])
                data = renderer.token(event, texts)
            else:
                data = renderer.finish(event)
            sent = True
            yield data
        if renderer.include_usage:
            yield renderer.usage()
        set_outcome("ok")
    except asyncio.CancelledError:
        set_outcome("cancelled")
        raise
    except DualVLLMError as exc:
        if not sent:
            raise
        log.warning("stream ended by an error after it started: %s", exc.message)
        set_outcome("upstream_error" if exc.status >= 500 else "client_error")
        yield error_frame(exc)
    except Exception as exc:
        if not sent:
            raise
        log.exception("unexpected error in a stream")
        set_outcome("internal_error")
        yield error_frame(exc)
    finally:
        await _aclose(events)
    yield DONE


async def with_keepalive(frames: AsyncIterator[bytes], interval: float) -> AsyncIterator[bytes]:
    """`frames`, plus a comment frame whenever none came for `interval` seconds.

    The pending `anext` runs as its own task and survives a keep-alive timeout (cancelling it
    would cancel the generation); closing this iterator cancels it, which cancels the request's
    upstream work."""
    pending: asyncio.Task[bytes] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(frames))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield KEEPALIVE
                continue
            try:
                data = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield data
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
        await _aclose(frames)


async def prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """`first`, then `rest` (closing `rest` when this iterator is closed)."""
    try:
        yield first
        async for data in rest:
            yield data
    finally:
        await _aclose(rest)
