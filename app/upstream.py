"""One vLLM upstream (a model, possibly on several replicas) behind one pooled httpx client.

Everything the gateway asks of vLLM goes through `UpstreamClient`: the per-step next-token
top-K probe (docs/VLLM_API.md), model discovery (`/v1/models`), tokenization
of text and of chat messages (`/tokenize`, so the gateway needs no model files),
detokenization (`/detokenize`) and `/tokenizer_info`. Failures become the typed errors of
app/errors.py:

| what happened                                   | error                         | HTTP |
|-------------------------------------------------|-------------------------------|------|
| read/write/pool timeout                         | UpstreamTimeoutError          | 504  |
| connect error or connect timeout, upstream 503   | UpstreamUnavailableError      | 503  |
| other 5xx, broken connection, malformed body     | UpstreamError                 | 502  |
| 4xx (the upstream's message is kept)            | UpstreamRejectedError         | 400  |

Retries: every call here is idempotent - the probe has `max_tokens: 1`, `temperature: 0`
and no side effect beyond warming the prefix cache, and sampling happens in the gateway, so
repeating a probe cannot change the output law - so every failure that is not the client's
(connect error, reset connection, timeout, any 5xx) is retried, at most
`Settings.upstream_retries` times per call and never past `Settings.upstream_retry_deadline`
seconds after the call began, with exponential backoff and jitter (so replicas recovering
together are not hit in lockstep). A retry goes to ANOTHER replica when there is one. A 4xx is
never retried (the same request gets the same answer), nor is a malformed 200 body. A batched
probe (app/probes.py) is one call: a batch that failed is retried as a batch.

Replicas are a pool: a replica whose call failed (retryably) is ejected, with a backoff that
doubles per consecutive failure (`Settings.replica_eject_seconds` up to
`Settings.replica_eject_max_seconds`), and is taken back only once its `/health` answers 200.
`replica(affinity)` prefers `urls[affinity % n]` (one sequence's prefix cache stays warm) but
skips ejected replicas, so a sequence whose replica fails moves to a healthy one.

Messages of the errors raised here name the upstream's role and the failure, never its URL (a
URL may hold credentials or internal host names); logs show URLs with credentials redacted
(`redact_url`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import re
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

import httpx
import orjson
from httpx_aiohttp import AiohttpTransport

from app.errors import (
    UpstreamError,
    UpstreamRejectedError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from app.probes import (
    LOGPROBS_ABOVE_ANY_LIMIT,
    MAX_LOGPROB_TOKEN_IDS,
    KindGate,
    ProbeBatcher,
    SpoiledAnswerError,
    parse_batch,
    parse_draft,
    parse_token_logprobs,
    parse_top_logprobs,
    token_ids_body,
)
from app.replicas import ReplicaPool, redact_url
from app.settings import Settings
from app.tasks import task_group

log = logging.getLogger(__name__)
T = TypeVar("T")

_TOKEN_ID_PREFIX = "token_id:"
_MAX_ALLOWED = re.compile(r"max allowed:\s*(\d+)")
_RETRY_BASE_SECONDS = 0.1
_RETRY_MAX_SECONDS = 2.0


class StartupError(RuntimeError):
    """The gateway must not serve: the message names the upstream and the fix.

    Not an HTTP error (no entry in app/errors.py's table): it stops `dual-vllm serve` (which
    answers /health and a 503 /ready while it waits) and the batch job before it reads its
    dataset. `waiting` is True when the upstream did not answer (worth retrying until
    DUAL_VLLM_STARTUP_TIMEOUT), False when it answered wrongly (a configuration to fix).
    """

    def __init__(self, message: str, *, waiting: bool = False) -> None:
        super().__init__(message)
        self.waiting = waiting


class CallObserver(Protocol):
    """The part of app.coordinator.Observer this module reports to."""

    def upstream_call(self, upstream: str, seconds: float, error: str | None) -> None: ...


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What `/v1/models` says about the served model, and its --max-logprobs (the largest
    `logprobs` it takes; its vocabulary size when started with -1) once
    `UpstreamClient.discover_max_logprobs` has read it (None: unknown)."""

    name: str
    max_model_len: int
    root: str | None = None
    max_logprobs: int | None = None


def _error_label(exc: UpstreamError) -> str:
    if isinstance(exc, UpstreamTimeoutError):
        return "timeout"
    if isinstance(exc, UpstreamUnavailableError):
        return "unavailable"
    if isinstance(exc, UpstreamRejectedError):
        return "rejected"
    return "bad_response"


def _retry_reason(exc: UpstreamError) -> str | None:
    """Why a failed call may be retried (a label of dual_vllm_upstream_retries_total), or None
    when it must not be (the upstream refused the request itself: 4xx)."""
    if isinstance(exc, UpstreamRejectedError):
        return None
    if isinstance(exc, UpstreamTimeoutError):
        return "timeout"
    cause = exc.__cause__
    if isinstance(exc, UpstreamUnavailableError):
        return "connect" if isinstance(cause, httpx.TransportError) else "unavailable"
    if isinstance(cause, httpx.TransportError):
        return "reset"
    return "server_error"


def _backoff(attempt: int) -> float:
    """Exponential backoff with jitter: a uniform draw in [1/2, 1] of the capped step."""
    step = min(_RETRY_BASE_SECONDS * 2**attempt, _RETRY_MAX_SECONDS)
    return float(step * random.uniform(0.5, 1.0))


def _upstream_message(response: httpx.Response) -> str:
    """The human part of an error body: vLLM's `error.message`, FastAPI's `detail`, or text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if "detail" in body:
            return str(body["detail"])
    return str(body)[:500]


class UpstreamClient:
    """One model behind one pooled `httpx.AsyncClient` (several URLs = replicas).

    `name` is "base" or "teacher" (error messages, metric labels). Create it, `await start()`
    (or `async with`), and `await aclose()` at the end: one client for the process lifetime.
    """

    def __init__(
        self,
        name: str,
        urls: Sequence[str],
        settings: Settings,
        *,
        model: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        observer: CallObserver | None = None,
    ) -> None:
        if not urls:
            raise ValueError("an upstream needs at least one URL")
        self.name = name
        self.urls = [u.rstrip("/") for u in urls]
        self.model = model
        self._settings = settings
        self._transport = transport
        self._observer = observer
        self._client: httpx.AsyncClient | None = None
        self._batchers: dict[str, ProbeBatcher] = {}  # by replica URL
        self._gates: dict[str, KindGate] = {}  # by replica URL (app/probes.py)
        self.pool = ReplicaPool(name, self.urls, settings, self._healthy, observer=observer)
        self.info: ModelInfo | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._client is not None:
            return
        s = self._settings
        # Explicit limits and timeouts (no unlimited pools, no timeout=None). The read timeout
        # bounds one probe; pool waits are bounded by the same read timeout.
        timeout = httpx.Timeout(
            connect=s.upstream_connect_timeout,
            read=s.upstream_read_timeout,
            write=s.upstream_read_timeout,
            pool=s.upstream_read_timeout,
        )
        limits = httpx.Limits(
            max_connections=s.upstream_max_connections,
            max_keepalive_connections=s.upstream_max_connections,
            # Below vLLM's own idle timeout (uvicorn's 5 s keep-alive): reusing a connection
            # the server is closing would fail the request with a reset.
            keepalive_expiry=4.0,
        )
        # httpx's API over aiohttp's connection pool: measured ~6x less client CPU per request
        # than httpx's own transport at 32 requests in flight (docs/BENCHMARKS.md).
        transport = self._transport or AiohttpTransport(limits=limits)
        self._client = httpx.AsyncClient(
            timeout=timeout,
            limits=limits,
            transport=transport,
            headers={"Content-Type": "application/json"},
        )

    async def aclose(self) -> None:
        await self.pool.aclose()
        batchers, self._batchers = list(self._batchers.values()), {}
        for batcher in batchers:
            await batcher.aclose()
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def __aenter__(self) -> UpstreamClient:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def replica(self, affinity: int = 0) -> str:
        """The replica for an affinity key (app/replicas.py)."""
        return self.pool.choose(affinity)

    def healthy(self) -> list[str]:
        """The replicas not ejected now."""
        return self.pool.healthy()

    async def _healthy(self, url: str) -> bool:
        client = self._client
        if client is None:
            return False
        try:
            response = await client.get(url + "/health", timeout=5.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    # --- transport ---------------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Mapping[str, Any] | None = None,
        affinity: int = 0,
        url: str | None = None,
        pinned: bool = False,
        observed: bool = True,
    ) -> httpx.Response:
        """One call with error mapping and retries (see the module docstring); `pinned`
        retries on the same replica (a question about that replica itself, e.g. its models);
        `observed=False` keeps an expected failure out of the call metrics."""
        client = self._client
        if client is None:
            raise RuntimeError(f"{self.name} upstream client used before start()")
        replica = url or self.replica(affinity)
        retries = self._settings.upstream_retries
        deadline = time.monotonic() + self._settings.upstream_retry_deadline
        attempt = 0
        while True:
            started = time.perf_counter()
            try:
                response = await self._send(client, method, replica + path, json)
            except UpstreamError as exc:
                if observed:
                    self._observe(started, exc)
                reason = _retry_reason(exc)
                if reason is None:
                    raise
                self.pool.failed(replica, reason)
                delay = _backoff(attempt)
                if attempt >= retries or time.monotonic() + delay > deadline:
                    raise
                following = replica if pinned else self.pool.next(replica)
                log.warning(
                    "%s upstream %s %s failed (%s: %s); retry %d/%d on %s in %.2fs",
                    self.name,
                    method,
                    redact_url(replica) + path,
                    reason,
                    exc.message,
                    attempt + 1,
                    retries,
                    redact_url(following),
                    delay,
                )
                self._count_retry(reason)
                await asyncio.sleep(delay)
                replica = following
                attempt += 1
                continue
            self._observe(started, None)
            self.pool.succeeded(replica)
            return response

    async def _send(
        self,
        client: httpx.AsyncClient,
        method: str,
        target: str,
        json: Mapping[str, Any] | None,
    ) -> httpx.Response:
        try:
            content = None if json is None else orjson.dumps(json)  # ~10x stdlib json
            response = await client.request(method, target, content=content)
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from exc
        self._check_status(response)
        return response

    def _transport_error(self, exc: httpx.TransportError) -> UpstreamError:
        name = self.name
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return UpstreamUnavailableError(
                f"{name} upstream is unreachable ({type(exc).__name__})", upstream=name
            )
        if isinstance(exc, httpx.TimeoutException):
            return UpstreamTimeoutError(
                f"{name} upstream did not answer in time ({type(exc).__name__})", upstream=name
            )
        return UpstreamError(
            f"{name} upstream connection failed ({type(exc).__name__})", upstream=name
        )

    def _check_status(self, response: httpx.Response) -> None:
        """Raise the mapped error of a 4xx/5xx answer (its body must have been read)."""
        name = self.name
        status = response.status_code
        if status < 400:
            return
        message = _upstream_message(response)
        if status == 503:
            raise UpstreamUnavailableError(
                f"{name} upstream is unavailable (503): {message}", upstream=name
            )
        if status >= 500:
            raise UpstreamError(f"{name} upstream error ({status}): {message}", upstream=name)
        raise UpstreamRejectedError(
            f"{name} upstream rejected the request: {message}", upstream=name
        )

    def _count_retry(self, reason: str) -> None:
        if self._observer is not None:
            hook = getattr(self._observer, "upstream_retry", None)
            if hook is not None:
                hook(self.name, reason)

    def _observe(self, started: float, exc: UpstreamError | None) -> None:
        if self._observer is not None:
            seconds = time.perf_counter() - started
            self._observer.upstream_call(
                self.name, seconds, None if exc is None else _error_label(exc)
            )

    def _json(self, response: httpx.Response) -> Any:
        try:
            return orjson.loads(response.content)
        except ValueError as exc:  # orjson.JSONDecodeError is a ValueError
            raise UpstreamError(
                f"{self.name} upstream returned a body that is not JSON "
                f"({response.headers.get('content-type', 'no content type')})",
                upstream=self.name,
            ) from exc

    def _malformed(self, what: str) -> UpstreamError:
        return UpstreamError(
            f"{self.name} upstream returned a malformed {what}", upstream=self.name
        )

    def _with_model(self, body: dict[str, Any]) -> dict[str, Any]:
        """`body` naming the served model (vLLM's default model when none is known yet)."""
        if self.model is not None:
            body["model"] = self.model
        return body

    # --- endpoints ---------------------------------------------------------------------------

    def probe_body(self, prompt: Sequence[int], k: int) -> dict[str, Any]:
        """The per-step request (vLLM reference §9): ids in, one position of raw top-K out.

        `temperature: 0` makes vLLM's own pick the argmax, so exactly K entries come back
        (K+1 only on ties); neutral penalties keep server defaults from moving that pick.
        """
        body: dict[str, Any] = {
            "prompt": list(prompt),
            "max_tokens": 1,
            "logprobs": k,
            "temperature": 0,
            "repetition_penalty": 1.0,
            "presence_penalty": 0,
            "frequency_penalty": 0,
            "return_tokens_as_token_ids": True,
            "stream": False,
        }
        return self._with_model(body)

    async def topk(self, prompt: Sequence[int], k: int, *, affinity: int = 0) -> dict[int, float]:
        """The next-token top-K (K or K+1 entries) after `prompt`: `{token_id: logprob}`.

        Concurrent probes to the same replica travel in one batched request
        (`Settings.upstream_batch_probes`; app/probes.py). A K above the upstream's
        --max-logprobs comes from the client's `mixing.top_k` (the configured K was checked at
        start-up): that 400 names the client's parameter, not vLLM's `logprobs`."""
        url = self.replica(affinity)
        try:
            if not self._settings.upstream_batch_probes:
                return await self._topk(prompt, k, url)
            batcher = self._batchers.get(url)
            if batcher is None:
                batcher = self._batchers[url] = ProbeBatcher(
                    lambda ids, k: self._topk(ids, k, url),
                    lambda prompts, k: self._topk_batch(prompts, k, url),
                    max_batch=self._settings.upstream_max_batch,
                )
            return await batcher.submit(prompt, k)
        except UpstreamRejectedError as exc:
            match = _MAX_ALLOWED.search(exc.message)
            if match is None:
                raise
            raise UpstreamRejectedError(
                f"mixing.top_k={k} is above the {self.name} upstream's limit of "
                f"{match.group(1)} logprobs (its --max-logprobs)",
                upstream=self.name,
                param="mixing.top_k",
            ) from exc

    async def _topk(self, prompt: Sequence[int], k: int, url: str) -> dict[int, float]:
        return await self._complete(
            self.probe_body(prompt, k),
            url,
            "topk",
            lambda body: parse_top_logprobs(body, upstream=self.name, k=k),
        )

    async def _topk_batch(
        self, prompts: list[list[int]], k: int, url: str
    ) -> list[dict[int, float]]:
        body = self.probe_body([], k)
        body["prompt"] = prompts  # vLLM's batch form: one choice per prompt, in order
        return await self._complete(
            body,
            url,
            "topk",
            lambda answer: parse_batch(answer, len(prompts), upstream=self.name, k=k),
        )

    async def token_logprobs(
        self, prompt: Sequence[int], ids: Sequence[int], *, affinity: int = 0
    ) -> dict[int, float]:
        """The exact raw next-token logprobs of `ids` after `prompt`: `{id: logprob}` (floored
        at -9999.0 like every vLLM logprob). vLLM's `logprob_token_ids` (docs/VLLM_API.md §7):
        at most 128 ids per request, so more go in concurrent requests to one replica."""
        wanted = list(dict.fromkeys(ids))
        url = self.replica(affinity)
        chunks = [
            wanted[i : i + MAX_LOGPROB_TOKEN_IDS]
            for i in range(0, len(wanted), MAX_LOGPROB_TOKEN_IDS)
        ]
        async with task_group() as group:
            tasks = [
                group.create_task(
                    self._complete(
                        token_ids_body(self.probe_body(prompt, 1), chunk),
                        url,
                        "ids",
                        functools.partial(parse_token_logprobs, ids=chunk, upstream=self.name),
                    )
                )
                for chunk in chunks
            ]
        return {i: lp for task in tasks for i, lp in task.result().items()}

    async def _complete(
        self, body: dict[str, Any], url: str, kind: str, parse: Callable[[Any], T]
    ) -> T:
        """POST /v1/completions to `url` through its KindGate and parse the answer; an answer
        spoiled by vLLM's batch bug (app/probes.py) is asked again like a failed call."""
        gate = self._gates.setdefault(url, KindGate())
        attempt = 0
        while True:
            async with gate.hold(kind):
                response = await self._request("POST", "/v1/completions", json=body, url=url)
            try:
                return parse(self._json(response))
            except SpoiledAnswerError as exc:
                delay = _backoff(attempt)
                if attempt >= self._settings.upstream_retries:
                    raise
                log.warning("%s; retry %d in %.2fs", exc.message, attempt + 1, delay)
                self._count_retry("spoiled")
                await asyncio.sleep(delay)
                attempt += 1

    async def draft(
        self,
        prompt: Sequence[int],
        tokens: int,
        k: int,
        temperature: float,
        *,
        seed: int | None = None,
        affinity: int = 0,
    ) -> AsyncGenerator[tuple[int, dict[int, float]], None]:
        """Sample up to `tokens` ids after `prompt` with a proposal the gateway can compute
        (docs/ALGORITHM.md §8: temperature T, `top_k = k`, `top_p = 1`, no penalties, EOS not
        a stop), streamed: per position as it is generated, the id and the raw top-k view it
        was drawn from (app/probes.py `parse_draft`). Closing the iterator early closes the
        connection, which aborts the request upstream. No retries: a round that loses its
        draft ends early (app/rounds.py). T below 1e-5 asks for greedy decoding."""
        client = self._client
        if client is None:
            raise RuntimeError(f"{self.name} upstream client used before start()")
        # The probe's request (ids, raw logprobs keyed by id, neutral penalties), sampling.
        body = self.probe_body(prompt, k)
        body.update(
            max_tokens=tokens,
            temperature=temperature if temperature >= 1e-5 else 0,
            top_k=k,
            top_p=1.0,
            min_p=0.0,
            ignore_eos=True,
            stream=True,
        )
        if seed is not None:
            body["seed"] = seed
        replica = self.replica(affinity)
        started = time.perf_counter()
        error: UpstreamError | None = None
        gate = self._gates.setdefault(replica, KindGate())
        try:
            request = client.build_request(
                "POST", replica + "/v1/completions", content=orjson.dumps(body)
            )
            # The whole stream holds the replica's gate: no engine step with an ids request.
            async with gate.hold("topk"):
                response = await client.send(request, stream=True)
                try:
                    if response.status_code >= 400:
                        await response.aread()
                        self._check_status(response)
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        for position in parse_draft(orjson.loads(line[6:]), upstream=self.name):
                            yield position
                finally:
                    await response.aclose()
        except httpx.TransportError as exc:
            error = self._transport_error(exc)
            raise error from exc
        except ValueError as exc:  # orjson: not JSON
            error = self._malformed("draft stream")
            raise error from exc
        except UpstreamError as exc:
            error = exc
            raise
        finally:
            self._observe(started, error)

    async def health(self) -> bool:
        """At least one replica answers /health with 200 (one short attempt each, no retries);
        a replica that answers is taken back into the pool, one that does not is ejected."""
        if self._client is None:
            return False

        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self._healthy(url)) for url in self.urls]
        for url, task in zip(self.urls, tasks, strict=True):
            if task.result():
                self.pool.answered(url)
            else:
                self.pool.failed(url, "health")
        return any(task.result() for task in tasks)

    async def discover(self) -> ModelInfo:
        """`/v1/models` of every replica that answers: the served model (Settings' name, else
        the only / first one) and its max_model_len (the smallest over replicas). A replica that
        does not answer is a warning (it is ejected and probed back in later); none answering
        raises the last replica's error."""
        infos: list[ModelInfo] = []
        answered: list[str] = []
        last: UpstreamError | None = None
        for url in self.urls:
            try:
                response = await self._request("GET", "/v1/models", url=url, pinned=True)
            except UpstreamRejectedError:
                raise
            except UpstreamError as exc:
                log.warning(
                    "%s replica %s does not answer at start-up (%s); it joins the pool once "
                    "its /health answers",
                    self.name,
                    redact_url(url),
                    exc.message,
                )
                last = exc
                continue
            body = self._json(response)
            shown = redact_url(url)
            try:
                cards = [c for c in body["data"] if isinstance(c, dict)]
            except (KeyError, TypeError) as exc:
                raise self._malformed("/v1/models body") from exc
            if not cards:
                raise StartupError(f"{self.name} upstream at {shown} serves no model")
            names = [str(c.get("id")) for c in cards]
            if self.model is not None:
                if self.model not in names:
                    raise StartupError(
                        f"{self.name} upstream at {shown} does not serve model {self.model!r} "
                        f"(it serves {', '.join(names)}); fix DUAL_VLLM_{self.name.upper()}_MODEL"
                    )
                card = cards[names.index(self.model)]
            else:
                card = cards[0]
            max_len = card.get("max_model_len")
            if not isinstance(max_len, int) or max_len <= 0:
                raise StartupError(
                    f"{self.name} upstream at {shown} does not report max_model_len for "
                    f"{card.get('id')!r} (is it a LoRA card?)"
                )
            root = card.get("root")
            infos.append(ModelInfo(str(card.get("id")), max_len, str(root) if root else None))
            answered.append(url)
        if not infos:
            assert last is not None
            raise last
        if len({i.name for i in infos}) > 1:
            raise StartupError(
                f"{self.name} replicas serve different models: "
                + ", ".join(
                    f"{redact_url(u)} -> {i.name}" for u, i in zip(answered, infos, strict=True)
                )
            )
        info = ModelInfo(infos[0].name, min(i.max_model_len for i in infos), infos[0].root)
        self.model = info.name
        self.info = info
        return info

    async def tokenize(
        self, text: str, *, add_special_tokens: bool = True, affinity: int = 0
    ) -> list[int]:
        body = self._with_model({"prompt": text, "add_special_tokens": add_special_tokens})
        response = await self._request("POST", "/tokenize", json=body, affinity=affinity)
        return self._tokens(self._json(response))

    async def tokenize_chat(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        add_generation_prompt: bool = True,
        affinity: int = 0,
        template_options: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """The model's own chat template applied by the upstream (vLLM's /tokenize chat form;
        `add_special_tokens: false` because the template already holds them).
        `template_options`: more fields of vLLM's TokenizeChatRequest (`continue_final_message`,
        `chat_template_kwargs`), sent as given."""
        body = self._with_model(
            {
                "messages": [dict(m) for m in messages],
                "add_generation_prompt": add_generation_prompt,
                "add_special_tokens": False,
                **(template_options or {}),
            }
        )
        response = await self._request("POST", "/tokenize", json=body, affinity=affinity)
        return self._tokens(self._json(response))

    def _tokens(self, body: Any) -> list[int]:
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in tokens
        ):
            raise self._malformed("/tokenize body")
        return tokens

    async def detokenize(self, ids: Sequence[int], *, affinity: int = 0) -> str:
        body = self._with_model({"tokens": list(ids)})
        response = await self._request("POST", "/detokenize", json=body, affinity=affinity)
        data = self._json(response)
        text = data.get("prompt") if isinstance(data, dict) else None
        if not isinstance(text, str):
            raise self._malformed("/detokenize body")
        return text

    async def tokenizer_info(self) -> dict[str, Any] | None:
        """`GET /tokenizer_info`, or None when the endpoint is not enabled (404)."""
        try:
            response = await self._request("GET", "/tokenizer_info")
        except UpstreamRejectedError:
            return None
        data = self._json(response)
        if not isinstance(data, dict):
            raise self._malformed("/tokenizer_info body")
        return data

    async def discover_max_logprobs(self, prompt: Sequence[int] = (0,)) -> int | None:
        """The replicas' --max-logprobs (the smallest; vLLM's -1 reads as its vocabulary size),
        also kept in `info.max_logprobs`. Read from the 400 of a probe asking for
        LOGPROBS_ABOVE_ANY_LIMIT logprobs ("... greater than max allowed: M"): vLLM checks the
        limit before the request reaches the engine, so this costs no forward pass. None when
        an answer names no limit (another server: nothing is assumed). `prompt`: any valid
        ids (id 0 exists in every vocabulary)."""
        limits: list[int] = []
        body = self.probe_body(prompt, LOGPROBS_ABOVE_ANY_LIMIT)
        for url in self.healthy():
            try:
                # The 400 is the answer sought: not an upstream error in the metrics.
                await self._request(
                    "POST", "/v1/completions", json=body, url=url, pinned=True, observed=False
                )
            except UpstreamRejectedError as exc:
                match = _MAX_ALLOWED.search(exc.message)
                if match is None:
                    return None
                limits.append(int(match.group(1)))
            else:
                return None
        found = min(limits) if limits else None
        if self.info is not None:
            self.info = replace(self.info, max_logprobs=found)
        return found

    async def check_logprobs(self, prompt: Sequence[int], k: int) -> None:
        """K against the upstream's --max-logprobs (`discover_max_logprobs`); when no limit can
        be read, one probe with logprobs=K. K above the limit is a StartupError."""
        url = self.replica(0)
        shown = redact_url(url)
        limit = await self.discover_max_logprobs(prompt)
        if limit is None:
            try:
                await self._topk(prompt, k, url)
                return
            except UpstreamRejectedError as exc:
                match = _MAX_ALLOWED.search(exc.message)
                if match is None:
                    raise StartupError(
                        f"{self.name} upstream at {shown} rejected a logprobs={k} probe: "
                        f"{exc.message}"
                    ) from exc
                limit = int(match.group(1))
        if k > limit:
            raise StartupError(
                f"{self.name} upstream at {shown} allows at most {limit} "
                f"logprobs but K={k} is configured: lower DUAL_VLLM_TOP_K (or the request's "
                f"mixing.top_k) or restart vLLM with --max-logprobs {k} or more"
            )
