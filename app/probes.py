"""The per-step probe's wire format and its coalescing.

A probe asks one upstream for the next-token top-K after a context (docs/VLLM_API.md §3): a
`/v1/completions` request with the context as token ids, `max_tokens: 1` and `logprobs: K`.
Its answer is read here into plain data, `{token_id: logprob}` (app/pair.py turns that into
the math's `TopK`).

`ProbeBatcher` coalesces the probes of concurrent sequences bound for the same upstream replica
into one batched request (`prompt` as a list of token-id lists; vLLM runs each prompt as its own
request, so prefix caching still applies, and answers one choice per prompt, in order). Probes
submitted in the same turn of the event loop travel together, so a lone sequence never waits,
and sequences whose probes came back together (one batch) send their next probes together too.
A 4xx answer to a batch is retried prompt by prompt, so one bad prompt fails only its own step,
with its own status; any other failure fails every probe of the batch, as it would have failed
each of them alone. When every caller of a batch has gone (a client disconnected), the request
is cancelled.

Fetching more for one step (certified support, docs/ALGORITHM.md §9): `token_ids_body` /
`parse_token_logprobs` ask for the exact logprobs of given ids (vLLM's `logprob_token_ids`,
docs/VLLM_API.md §7). vLLM 0.32's V1 sampler has a batch bug: while a request with
`logprob_token_ids` shares an engine step with a top-K request, the top-K request's answer is
replaced by `{sampled id: lp, 0: -9999.0}` (vllm-project/vllm PR #51789, open). `KindGate` keeps
this client's own top-K probes and id requests to one replica from overlapping, and
`parse_choice(..., k=K)` recognises a spoiled top-K answer (SpoiledAnswerError, retried by
app/upstream.py) when the overlap came from elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from app.errors import UpstreamError, UpstreamRejectedError

_TOKEN_ID_PREFIX = "token_id:"
# vLLM's MAX_LOGPROB_TOKEN_IDS (vllm/sampling_params.py): ids per request.
MAX_LOGPROB_TOKEN_IDS = 128
# The `logprobs` of the start-up request that reads --max-logprobs from its 400 (no model has
# this many tokens; vLLM refuses it before the engine, so the request costs no forward pass).
LOGPROBS_ABOVE_ANY_LIMIT = 2**30

SendOne = Callable[[list[int], int], Awaitable[dict[int, float]]]
SendBatch = Callable[[list[list[int]], int], Awaitable[list[dict[int, float]]]]


class SpoiledAnswerError(UpstreamError):
    """A top-K answer spoiled by vLLM's `logprob_token_ids` batch bug (module docstring):
    transient, the same probe asked again is answered right."""


def parse_top_logprobs(body: Any, *, upstream: str, k: int | None = None) -> dict[int, float]:
    """The first generated position's `{"token_id:123": lp}` of a completions body, as
    `{123: lp}` (plain data: app/pair.py turns it into the math's `TopK`).

    Every entry is used (vLLM's K+1 case: its sampled token first, outside the top K;
    docs/ALGORITHM.md §0). Entries whose value is null are dropped (no information); a null
    position, a text key or a non-number value is a malformed body. With `k` (the request's
    `logprobs`), an answer spoiled by vLLM's batch bug raises SpoiledAnswerError.
    """
    try:
        return parse_choice(body["choices"][0], upstream=upstream, k=k)
    except (KeyError, IndexError, TypeError) as exc:
        raise UpstreamError(
            f"{upstream} upstream returned a completion without top_logprobs", upstream=upstream
        ) from exc


def parse_choice(choice: Any, *, upstream: str, k: int | None = None) -> dict[int, float]:
    """One choice's first position (see `parse_top_logprobs`)."""
    try:
        logprobs = choice["logprobs"]
        top = logprobs["top_logprobs"]
        first = top[0]
    except (KeyError, IndexError, TypeError) as exc:
        raise UpstreamError(
            f"{upstream} upstream returned a completion without top_logprobs", upstream=upstream
        ) from exc
    return parse_position(first, upstream=upstream, k=k)


def parse_position(first: Any, *, upstream: str, k: int | None = None) -> dict[int, float]:
    """One generated position's `top_logprobs` entry as `{id: logprob}` (see
    `parse_top_logprobs`); with `k`, a top-K answer spoiled by vLLM's batch bug raises
    SpoiledAnswerError."""
    if first is None:
        raise UpstreamError(
            f"{upstream} upstream returned null top_logprobs for the next token",
            upstream=upstream,
        )
    if not isinstance(first, dict):
        raise UpstreamError(
            f"{upstream} upstream returned malformed top_logprobs", upstream=upstream
        )
    mapping: dict[int, float] = {}
    for key, value in first.items():
        if not isinstance(key, str) or not key.startswith(_TOKEN_ID_PREFIX):
            raise UpstreamError(
                f"{upstream} upstream keyed logprobs by text ({key!r}); it must honour "
                "return_tokens_as_token_ids",
                upstream=upstream,
            )
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise UpstreamError(
                f"{upstream} upstream returned a non-numeric logprob {value!r}",
                upstream=upstream,
            )
        try:
            token_id = int(key[len(_TOKEN_ID_PREFIX) :])
        except ValueError as exc:
            raise UpstreamError(
                f"{upstream} upstream returned a bad token key {key!r}", upstream=upstream
            ) from exc
        mapping[token_id] = float(value)
    if not mapping:
        raise UpstreamError(
            f"{upstream} upstream returned no usable top_logprobs", upstream=upstream
        )
    if k is not None and len(mapping) < k and mapping.get(0) == -9999.0:
        # A true top-K has K distinct ids (K <= --max-logprobs <= the vocabulary); the spoiled
        # one is the sampled id plus vLLM's padding, id 0 at -inf. Undetectable for K = 1.
        raise SpoiledAnswerError(
            f"{upstream} upstream answered a logprobs={k} probe with {len(mapping)} entries "
            "padded with id 0 (vLLM's logprob_token_ids batch bug)",
            upstream=upstream,
        )
    return mapping


def parse_batch(
    body: Any, count: int, *, upstream: str, k: int | None = None
) -> list[dict[int, float]]:
    """A batched probe's answer: one mapping per prompt, by the choices' `index`."""
    try:
        choices = body["choices"]
        by_index = {int(choice["index"]): choice for choice in choices}
        return [parse_choice(by_index[i], upstream=upstream, k=k) for i in range(count)]
    except (KeyError, TypeError, ValueError) as exc:
        raise UpstreamError(
            f"{upstream} upstream answered a batch of {count} probes without a choice for each",
            upstream=upstream,
        ) from exc


def parse_draft(body: Any, *, upstream: str) -> list[tuple[int, dict[int, float]]]:
    """A draft stream's chunk (docs/ALGORITHM.md §8): per generated position it carries, the
    drafted id and the drafter's `{token_id: logprob}` view of that position (the
    distribution it drew from). A chunk without tokens (the last one) gives none; an error
    chunk is an upstream error."""
    if isinstance(body, dict) and "error" in body:
        raise UpstreamError(
            f"{upstream} upstream failed while drafting: {body['error']}", upstream=upstream
        )
    try:
        logprobs = body["choices"][0]["logprobs"] if body["choices"] else None
        if logprobs is None:
            return []
        tokens = logprobs["tokens"]
        views = logprobs["top_logprobs"]
        if len(tokens) != len(views):
            raise ValueError("tokens and top_logprobs differ in length")
        if not all(token.startswith(_TOKEN_ID_PREFIX) for token in tokens):
            raise ValueError("a token not keyed by id")
        drafted = [int(token[len(_TOKEN_ID_PREFIX) :]) for token in tokens]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise UpstreamError(
            f"{upstream} upstream returned a malformed draft ({exc})", upstream=upstream
        ) from exc
    positions: list[tuple[int, dict[int, float]]] = []
    for token_id, view in zip(drafted, views, strict=True):
        mapping = parse_position(view, upstream=upstream)
        if token_id not in mapping:
            raise UpstreamError(
                f"{upstream} upstream drafted token {token_id} without its logprob",
                upstream=upstream,
            )
        positions.append((token_id, mapping))
    return positions


def token_ids_body(probe: dict[str, Any], ids: Sequence[int]) -> dict[str, Any]:
    """A probe body (`UpstreamClient.probe_body`) asking for the exact logprobs of `ids` (at
    most MAX_LOGPROB_TOKEN_IDS) instead of the top K. vLLM 0.32 answers the sampled id plus
    exactly these ids, keyed `token_id:<id>`; it requires `logprobs` to be set but ignores its
    value (so --max-logprobs does not apply): 1 is sent."""
    return {**probe, "logprobs": 1, "logprob_token_ids": list(ids)}


def parse_token_logprobs(body: Any, ids: Sequence[int], *, upstream: str) -> dict[int, float]:
    """The answer to a `token_ids_body` request: `{id: logprob}` for exactly `ids` (the
    sampled id that vLLM adds is dropped unless asked for). A missing id means the upstream
    ignored `logprob_token_ids` (vLLM before 0.32 accepts and ignores unknown fields)."""
    mapping = parse_top_logprobs(body, upstream=upstream)
    missing = [i for i in ids if i not in mapping]
    if missing:
        raise UpstreamError(
            f"{upstream} upstream left out {len(missing)} of the {len(ids)} requested token ids "
            f"(first {missing[0]}); it needs vLLM 0.32 or newer for logprob_token_ids",
            upstream=upstream,
        )
    return {i: mapping[i] for i in ids}


class KindGate:
    """Requests of one kind (e.g. "topk") to one replica run together; a request of another
    kind ("ids") waits until none of the first is in flight, and new requests of the running
    kind wait behind it (no starvation). Works around vLLM's batch bug (module docstring):
    two HTTP requests that never overlap never share an engine step."""

    def __init__(self) -> None:
        self._kind: str | None = None
        self._active = 0
        self._waiting: Counter[str] = Counter()
        self._released = asyncio.Event()

    def _may_enter(self, kind: str) -> bool:
        if self._active == 0:
            return True
        others_wait = any(n for other, n in self._waiting.items() if other != kind)
        return self._kind == kind and not others_wait

    @contextlib.asynccontextmanager
    async def hold(self, kind: str) -> AsyncIterator[None]:
        self._waiting[kind] += 1
        try:
            while not self._may_enter(kind):
                await self._released.wait()
        finally:
            self._waiting[kind] -= 1
        self._kind = kind  # no await since the check: atomic on the event loop
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1
            if self._active == 0:
                released, self._released = self._released, asyncio.Event()
                released.set()


@dataclass(slots=True)
class _Probe:
    prompt: list[int]
    future: asyncio.Future[dict[int, float]]


class ProbeBatcher:
    """Coalesces the probes bound for one upstream replica (see the module docstring).

    `send_one(prompt, k)` and `send_batch(prompts, k)` make the HTTP requests (with the
    client's error mapping and retries); at most `max_batch` prompts travel in one request.
    """

    def __init__(self, send_one: SendOne, send_batch: SendBatch, *, max_batch: int) -> None:
        self._send_one = send_one
        self._send_batch = send_batch
        self._max_batch = max_batch
        self._pending: dict[int, list[_Probe]] = {}
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, prompt: Sequence[int], k: int) -> dict[int, float]:
        loop = asyncio.get_running_loop()
        probe = _Probe(list(prompt), loop.create_future())
        self._pending.setdefault(k, []).append(probe)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await probe.future

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, {}
        for k, probes in pending.items():
            for start in range(0, len(probes), self._max_batch):
                chunk = probes[start : start + self._max_batch]
                task = asyncio.get_running_loop().create_task(self._send(chunk, k))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                abandon = functools.partial(_abandon, task, chunk)
                for probe in chunk:
                    probe.future.add_done_callback(abandon)

    async def _send(self, probes: list[_Probe], k: int) -> None:
        live = [p for p in probes if not p.future.done()]
        if not live:
            return
        try:
            if len(live) == 1:
                results = [await self._send_one(live[0].prompt, k)]
            else:
                results = await self._send_batch([p.prompt for p in live], k)
        except UpstreamRejectedError as exc:
            if len(live) == 1:
                _fail(live, exc)
                return
            # One prompt of the batch was refused: find out whose, each on its own.
            async with asyncio.TaskGroup() as group:
                for probe in live:
                    group.create_task(self._send([probe], k))
            return
        except asyncio.CancelledError:
            for probe in live:
                probe.future.cancel()
            raise
        except Exception as exc:
            _fail(live, exc)
            return
        for probe, result in zip(live, results, strict=True):
            if not probe.future.done():
                probe.future.set_result(result)

    async def aclose(self) -> None:
        """Cancel the requests in flight (the client is closing)."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))


def _fail(probes: Sequence[_Probe], exc: Exception) -> None:
    for probe in probes:
        if not probe.future.done():
            probe.future.set_exception(exc)


def _abandon(task: asyncio.Task[None], probes: Sequence[_Probe], _: object) -> None:
    """A caller went away; when all of a batch's callers have, cancel its request."""
    if not task.done() and all(p.future.cancelled() for p in probes):
        task.cancel()
