"""One exception tree and ONE table of how each error looks on the wire.

Every error the gateway returns, as JSON or as an SSE error frame, goes through `error_body`
so status, OpenAI `type` and `code` never drift apart (OpenAI error shape:
`{"error": {"message", "type", "param", "code"}}`, docs/VLLM_API.md §4.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class ErrorKind:
    status: int
    type: str
    code: str | None


# The table. Status codes follow README.md: 4xx for the client's mistakes, 502/503/504 upstream.
INVALID_REQUEST = ErrorKind(400, "invalid_request_error", None)
CONTEXT_LENGTH = ErrorKind(400, "invalid_request_error", "context_length_exceeded")
AUTHENTICATION = ErrorKind(401, "authentication_error", "invalid_api_key")
NOT_FOUND = ErrorKind(404, "invalid_request_error", "model_not_found")
PAYLOAD_TOO_LARGE = ErrorKind(413, "invalid_request_error", "request_too_large")
RATE_LIMIT = ErrorKind(429, "rate_limit_error", "too_many_concurrent_requests")
INTERNAL = ErrorKind(500, "internal_error", None)
UPSTREAM_BAD_RESPONSE = ErrorKind(502, "upstream_error", "bad_gateway")
UPSTREAM_UNAVAILABLE = ErrorKind(503, "upstream_error", "upstream_unavailable")
UPSTREAM_TIMEOUT = ErrorKind(504, "upstream_error", "upstream_timeout")
# The gateway itself is not serving (app/lifecycle.py): still waiting for its upstreams at
# start-up, or shutting down.
GATEWAY_STARTING = ErrorKind(503, "service_unavailable_error", "gateway_starting")
GATEWAY_DRAINING = ErrorKind(503, "service_unavailable_error", "gateway_draining")


class DualVLLMError(Exception):
    """Base of every error the gateway turns into an OpenAI-shaped response."""

    kind: ClassVar[ErrorKind] = INTERNAL

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    @property
    def status(self) -> int:
        return self.kind.status


class InvalidRequestError(DualVLLMError):
    kind = INVALID_REQUEST


class ContextLengthError(InvalidRequestError):
    kind = CONTEXT_LENGTH


class AuthenticationError(DualVLLMError):
    kind = AUTHENTICATION


class ModelNotFoundError(DualVLLMError):
    kind = NOT_FOUND


class RateLimitError(DualVLLMError):
    kind = RATE_LIMIT


class UpstreamError(DualVLLMError):
    """The upstream answered with something unusable (5xx, malformed body): 502."""

    kind = UPSTREAM_BAD_RESPONSE

    def __init__(self, message: str, *, upstream: str, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.upstream = upstream


class UpstreamUnavailableError(UpstreamError):
    """Could not connect, or the upstream said 503: 503."""

    kind = UPSTREAM_UNAVAILABLE


class UpstreamTimeoutError(UpstreamError):
    """The upstream did not answer in time: 504."""

    kind = UPSTREAM_TIMEOUT


class UpstreamRejectedError(UpstreamError):
    """The upstream said 4xx to a request the gateway built from the client's input.

    Its message is the client's business (e.g. a token id out of the vocabulary), so it is a
    400 for the client, with the upstream's message.
    """

    kind = INVALID_REQUEST


def error_body(
    message: str, kind: ErrorKind = INTERNAL, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind.type, "param": param, "code": kind.code}}


def error_body_for(exc: DualVLLMError) -> dict[str, Any]:
    return error_body(exc.message, exc.kind, exc.param)
