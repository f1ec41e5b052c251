"""Server-sent events: the framing, and the driver that turns engine events into frames
(OpenAI's streaming format, docs/VLLM_API.md). The chunks themselves are app/render's.

Framing: each event is `data: <json>\\n\\n`; the stream ends with `data: [DONE]\\n\\n`. An error
after the stream has started goes out as ONE `data: {"error": ...}` frame (the body of
app/errors.py's table, the same as the JSON error responses) followed by `data: [DONE]`; the
OpenAI client raises `APIError` on it. While no event is ready, a comment line
(`: keep-alive`) goes out every `Settings.stream_keepalive_seconds` so proxies keep the
connection open; SSE clients ignore comments. With `stream_options.include_usage` a last chunk
with `choices: []` and the usage precedes [DONE].
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from pydantic import BaseModel

from app.errors import INTERNAL, DualVLLMError, error_body, error_body_for
from app.generation import Event, FinishEvent, TokenEvent

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


class ChunkRenderer(Protocol):
    """The chunks of one request's stream (app/render's renderers)."""

    @property
    def include_usage(self) -> bool: ...

    def text_ids(self, event: TokenEvent) -> list[int] | None: ...

    def token_chunk(self, event: TokenEvent, texts: Mapping[int, str] | None) -> BaseModel: ...

    def finish_chunk(self, event: FinishEvent) -> BaseModel: ...

    def usage_chunk(self) -> BaseModel: ...


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
    renderer: ChunkRenderer,
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
    last_token_at: dict[int, float] = {}  # per choice, for the inter-token latency
    try:
        async for event in events:
            now = time.perf_counter()
            if isinstance(event, TokenEvent):
                if observer is not None:
                    if first_token:
                        observer.time_to_first_token(now - started)
                    elif event.index in last_token_at:
                        observer.inter_token_latency(now - last_token_at[event.index])
                first_token = False
                last_token_at[event.index] = now
                ids = renderer.text_ids(event)
                texts = None
                if token_texts is not None and ids is not None:
                    texts = await token_texts(ids)
                data = frame(renderer.token_chunk(event, texts))
            else:
                data = frame(renderer.finish_chunk(event))
            sent = True
            yield data
        if renderer.include_usage:
            yield frame(renderer.usage_chunk())
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


async def with_keepalive(
    frames: AsyncIterator[bytes],
    interval: float,
    *,
    cut: asyncio.Event | None = None,
    on_cut: Callable[[], Sequence[bytes]] = tuple,
) -> AsyncIterator[bytes]:
    """`frames`, plus a comment frame whenever none came for `interval` seconds; when `cut`
    is set (the drain deadline, app/lifecycle.py), the generation is cancelled and the frames
    `on_cut()` returns (an error frame and [DONE]) end the stream.

    The pending `anext` runs as its own task and survives a keep-alive timeout (cancelling it
    would cancel the generation); closing this iterator cancels it, which cancels the request's
    upstream work."""
    pending: asyncio.Task[bytes] | None = None
    waiter = asyncio.ensure_future(cut.wait()) if cut is not None else None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(frames))
            waiting = {pending} if waiter is None else {pending, waiter}
            await asyncio.wait(waiting, timeout=interval, return_when=asyncio.FIRST_COMPLETED)
            if pending.done():
                try:
                    data = pending.result()
                except StopAsyncIteration:
                    return
                pending = None
                yield data
            elif waiter is not None and waiter.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await pending
                pending = None
                for data in on_cut():
                    yield data
                return
            else:
                yield KEEPALIVE
    finally:
        if waiter is not None:
            waiter.cancel()
        if pending is not None:
            if not pending.done():
                pending.cancel()
            # Retrieve its outcome (e.g. the StopAsyncIteration of a stream that ended while
            # the client was leaving), so asyncio logs no "exception was never retrieved".
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):
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
