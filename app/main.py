"""`create_app()`: the FastAPI app, its lifespan, admission and the error handlers.

Nothing happens at import time. The lifespan builds the coordinator (both upstream clients)
and the metrics, and closes them; tests and `dual-vllm serve` may pass their own.

Every error leaves through app/errors.py's table (`{"error": {message, type, param, code}}`):
validation errors are 400 naming the parameter (never FastAPI's 422), unknown exceptions are a
logged 500 with a generic message (never a stack trace or a path).

Admission (a pure ASGI middleware, so it also covers the whole life of a stream): API keys on
`/v1/*` and the API docs (`/docs`, `/redoc`, `/openapi.json`) when `Settings.api_keys` is set
(401, constant-time comparison); a 503 while the gateway starts or drains (app/lifecycle.py);
the body size (413); then at most `Settings.max_concurrent_requests` generation requests at
once, the next ones waiting in a bounded FIFO queue (`Settings.queue_timeout`,
`Settings.max_queued_requests`) before a 429 with Retry-After; and the request metrics (in
flight, duration, outcome, queue wait).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import (
    AUTHENTICATION,
    INTERNAL,
    INVALID_REQUEST,
    PAYLOAD_TOO_LARGE,
    RATE_LIMIT,
    DualVLLMError,
    ErrorKind,
    error_body,
    error_body_for,
)
from app.lifecycle import Lifecycle
from app.routes import ENDPOINTS, OUTCOME_KEY, Backend, Gateway, HTTPObserver, router
from app.settings import Settings
from app.version import version

log = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None,
    *,
    coordinator: Backend | None = None,
    metrics: HTTPObserver | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    lifecycle: Lifecycle | None = None,
) -> FastAPI:
    """The gateway app. Without `settings` they are read from the environment now; without
    `coordinator` / `metrics` the lifespan builds (and closes) them. `transport` replaces the
    network under the coordinator it builds (in-process tests: tests.fakes.pair_transport).
    `lifecycle` (app/lifecycle.py) is how `dual-vllm serve` starts and drains the app; without
    it the app serves as soon as its lifespan has started."""
    settings = Settings() if settings is None else settings
    life = Lifecycle() if lifecycle is None else lifecycle

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            observer = metrics
            if observer is None:
                from app.metrics import Metrics

                observer = Metrics()
            if coordinator is None:
                from app.coordinator import Coordinator

                built = Coordinator(
                    settings,
                    observer=observer,  # type: ignore[arg-type]
                    transport=transport,
                )
                backend: Backend = await stack.enter_async_context(built)
            else:
                backend = coordinator
            app.state.gateway = Gateway(
                settings=settings, backend=backend, metrics=observer, lifecycle=life
            )
            yield

    docs = settings.docs_enabled
    app = FastAPI(
        title="dual-vllm",
        summary="OpenAI-compatible gateway sampling from the mixture of two vLLM models",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.include_router(router)
    running_version = version()

    @app.get("/version")
    async def get_version() -> dict[str, str]:
        """The gateway's version (open like /health: no API key, no upstream call)."""
        return {"version": running_version}

    app.add_exception_handler(DualVLLMError, _dual_vllm_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error)
    app.add_middleware(AdmissionMiddleware, settings=settings, lifecycle=life)
    return app


# --- errors --------------------------------------------------------------------------------


def _error(message: str, kind: ErrorKind, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, param), status_code=kind.status)


async def _dual_vllm_error(request: Request, exc: DualVLLMError) -> JSONResponse:
    if exc.status >= 500:
        log.warning("%s: %s", type(exc).__name__, exc.message)
    return JSONResponse(error_body_for(exc), status_code=exc.status)


# pydantic adds union-member tags to an error's location (`prompt.list[int].0`,
# `content.str`); they are not parameter names.
_TAG = re.compile(r"[\[\]\-]|^[A-Z]|^(str|int|float|bool|list|dict|none|literal)$")


def _param(loc: tuple[int | str, ...]) -> str | None:
    parts: list[str] = []
    for item in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif not _TAG.search(item):
            parts.append(("." if parts else "") + item)
    return "".join(parts) or None


def validation_message(errors: list[Any]) -> tuple[str, str | None]:
    """(message, param) for the first pydantic error, in OpenAI's style."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    param = _param(tuple(first.get("loc", ())))
    kind = first.get("type", "")
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "json_invalid":
        return "the request body is not valid JSON", None
    if param is None:
        if kind == "missing":
            return "a JSON request body is required", None
        if kind in ("dict_type", "model_attributes_type", "model_type"):
            return "the request body must be a JSON object", None
        return f"invalid request body: {message}", None
    if kind == "extra_forbidden":
        return f"`{param}` is not a supported parameter", param
    if kind == "missing":
        return f"`{param}` is required", param
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"invalid `{param}`: {message}{more}", param


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = validation_message(list(exc.errors()))
    return _error(message, INVALID_REQUEST, param)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = ErrorKind(exc.status_code, "invalid_request_error", None)
    if exc.status_code == PAYLOAD_TOO_LARGE.status:
        kind = PAYLOAD_TOO_LARGE
    response = _error(str(exc.detail), kind)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected error on %s", request.url.path, exc_info=exc)
    return _error("internal server error", INTERNAL)


# --- admission -----------------------------------------------------------------------------


def _outcome(status: int) -> str:
    if status < 400:
        return "ok"
    if status == 429:
        return "rate_limited"
    if status == 499:
        return "cancelled"
    if status < 500:
        return "client_error"
    if status in (502, 503, 504):
        return "upstream_error"
    return "internal_error"


# The generated API documentation describes every parameter: it follows the API-key rule of
# /v1/* (Settings.docs_enabled = false removes it).
DOC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


def _protected(path: str) -> bool:
    return path.startswith("/v1/") or path in DOC_PATHS


class _BodyTooLarge(HTTPException):
    """The request body passed Settings.max_body_bytes while it was being read (an
    HTTPException so FastAPI's body reader lets it through instead of making it a 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than the limit of {limit} bytes")


def _content_length(scope: Scope) -> int:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


class AdmissionMiddleware:
    """API keys, the concurrency limit and the request metrics (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, settings: Settings, lifecycle: Lifecycle) -> None:
        self.app = app
        self.keys = [key.encode() for key in settings.api_keys]
        self.limit = settings.max_concurrent_requests
        self.max_body = settings.max_body_bytes
        self.queue_timeout = settings.queue_timeout
        self.max_queue = settings.max_queued_requests
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.lifecycle = lifecycle

    @property
    def in_flight(self) -> int:
        return self.lifecycle.in_flight

    def _too_large(self) -> JSONResponse:
        return _error(
            f"the request body is larger than the limit of {self.max_body} bytes",
            PAYLOAD_TOO_LARGE,
        )

    def _authorized(self, scope: Scope) -> bool:
        header = b""
        for name, value in scope.get("headers", ()):
            if name.lower() == b"authorization":
                header = value
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        # Compare with every key, in constant time per key (no early exit on a match).
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(token, key)
        return matched and scheme.lower() == b"bearer"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        endpoint = ENDPOINTS.get(path)
        metrics: HTTPObserver | None = None
        if endpoint is not None:
            gateway = getattr(scope["app"].state, "gateway", None)
            metrics = None if gateway is None else gateway.metrics
        started = time.perf_counter()

        def finished(outcome: str) -> None:
            if metrics is not None and endpoint is not None:
                metrics.request_finished(endpoint, outcome, time.perf_counter() - started)

        if self.keys and _protected(path) and not self._authorized(scope):
            if metrics is not None and endpoint is not None:
                metrics.request_started(endpoint)
                finished("client_error")
            response = _error("invalid or missing API key", AUTHENTICATION)
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        if metrics is not None:
            metrics.request_started(endpoint)
        refusal = self.lifecycle.refusal()
        if refusal is not None:
            finished("unavailable")
            response = _error(*refusal)
            response.headers["Retry-After"] = "5"
            await response(scope, receive, send)
            return
        if _content_length(scope) > self.max_body:
            finished("client_error")
            await self._too_large()(scope, receive, send)
            return
        queued = time.perf_counter()
        admitted = await self._acquire()
        queue_wait = getattr(metrics, "queue_wait", None)
        if queue_wait is not None:
            queue_wait(time.perf_counter() - queued, admitted)
        if not admitted:
            finished("rate_limited")
            message = (
                f"too many concurrent requests (the limit is {self.limit}, and the wait queue "
                "is full or the wait was too long); retry later"
            )
            response = _error(message, RATE_LIMIT)
            response.headers["Retry-After"] = str(max(1, round(self.queue_timeout)))
            await response(scope, receive, send)
            return
        status = 500
        started_response = False
        state: dict[str, Any] = scope.setdefault("state", {})
        received = 0
        completed = False  # the last body frame went out
        abandoned = False  # the client went away before that

        async def receive_bounded() -> Message:
            # A body without Content-Length (chunked) is counted as it arrives.
            nonlocal received, abandoned
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise _BodyTooLarge(self.max_body)
            elif message["type"] == "http.disconnect" and not completed:
                abandoned = True
            return message

        async def send_status(message: Message) -> None:
            nonlocal status, started_response, completed
            if message["type"] == "http.response.start":
                status = message["status"]
                started_response = True
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                completed = True
            await send(message)

        outcome = "internal_error"
        try:
            await self.app(scope, receive_bounded, send_status)
            outcome = state.get(OUTCOME_KEY) or _outcome(status)
            if abandoned and outcome == "ok":
                # Nobody received the end of a response that went well: not "ok". (An error
                # keeps its outcome: a client leaving on an error frame is no cancellation.)
                outcome = "cancelled"
        except _BodyTooLarge:
            outcome = "client_error"
            if not started_response:
                await self._too_large()(scope, receive, send)
        except BaseException as exc:
            outcome = "cancelled" if not isinstance(exc, Exception) else "internal_error"
            raise
        finally:
            self._release()
            finished(outcome)

    async def _acquire(self) -> bool:
        """A slot under the concurrency limit: at once when one is free and nobody waits, else
        after waiting in FIFO order (at most `queue_timeout` seconds, at most `max_queue`
        waiters). False: no slot (429)."""
        if self.lifecycle.in_flight < self.limit and not self._waiters:
            self.lifecycle.enter()
            return True
        if len(self._waiters) >= self.max_queue or self.queue_timeout <= 0:
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, self.queue_timeout)
        except TimeoutError:
            return waiter.done() and not waiter.cancelled()
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release()  # a slot was handed over just as the client left
            raise
        return True

    def _release(self) -> None:
        """Hand the slot to the first live waiter (in flight stays the same), else free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.lifecycle.leave()
