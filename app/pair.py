"""The two upstreams as one: both clients, the start-up checks, the EOS ids, readiness, the
per-step probe and the cached token texts.

`UpstreamPair` owns the base and teacher `UpstreamClient`s (app/upstream.py, which speaks HTTP
and returns plain data); this module builds the math's input types from that data (`TopK`,
app/sampling), so the HTTP client never depends on the math.

Start-up waits (retrying with backoff, up to `Settings.startup_timeout`) while an upstream does
not answer, and refuses to serve (StartupError, naming the upstream and the fix) when it still
does not, when the two tokenizers split a probe text differently (token-id mixing needs one
tokenizer), when K is above an upstream's --max-logprobs, or when no EOS id can be found.
The K check reads each upstream's --max-logprobs from a refused request (no forward pass;
`ModelInfo.max_logprobs`, the limit for fetching a larger K later).

EOS ids: `Settings.eos_token_ids` if set; else the teacher's `GET /tokenizer_info` (vLLM with
`--enable-tokenizer-info-endpoint`) gives `eos_token`, which the teacher's `/tokenize`
(without special tokens) turns into its id; else a StartupError says to set
DUAL_VLLM_EOS_TOKEN_IDS or enable that endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

from app.detok import Decoder, IncrementalText, LocalDecoder, RemoteDecoder
from app.errors import UpstreamError, UpstreamRejectedError, UpstreamUnavailableError
from app.generation import Observer
from app.replicas import redact_url
from app.sampling import topk_from_mapping
from app.sampling.types import SamplingError, TopK
from app.settings import Settings
from app.tasks import both, task_group
from app.upstream import ModelInfo, StartupError, UpstreamClient

log = logging.getLogger(__name__)

# Backoff of the start-up checks while an upstream does not answer.
_STARTUP_RETRY_SECONDS = 0.5
_STARTUP_RETRY_MAX_SECONDS = 10.0

# Probe text of the start-up tokenizer check: ASCII, accents, a multi-byte symbol, CJK, digits
# and whitespace, so two different vocabularies almost surely split it differently.
TOKENIZER_PROBE_TEXT = "Hello, world! Héllo wörld — 123 ✓ 日本語\n  tab\tend."


class TokenTextCache:
    """Token id -> its text, for the `tokens` / `top_logprobs` keys of `logprobs`.

    Texts come from the teacher's decoder (app/detok.py: its tokenizer in process, or its
    /detokenize) of the single id. The vocabulary is fixed, so a bounded LRU makes this a
    one-time cost per id."""

    def __init__(self, source: Decoder, *, size: int = 65536, concurrency: int = 8) -> None:
        self._source = source
        self._size = size
        self._texts: OrderedDict[int, str] = OrderedDict()
        self._limit = asyncio.Semaphore(concurrency)

    async def _one(self, token_id: int) -> None:
        async with self._limit:
            text = await self._source.decode([token_id])
        self._texts[token_id] = text
        while len(self._texts) > self._size:
            self._texts.popitem(last=False)

    async def __call__(self, ids: Sequence[int]) -> Mapping[int, str]:
        missing = sorted({i for i in ids if i not in self._texts})
        if missing:
            async with task_group() as group:
                for token_id in missing:
                    group.create_task(self._one(token_id))
        out: dict[int, str] = {}
        for token_id in ids:
            if token_id in self._texts:
                self._texts.move_to_end(token_id)
                out[token_id] = self._texts[token_id]
        return out


def to_topk(mapping: Mapping[int, float], upstream: str) -> TopK:
    """An upstream's `{token_id: logprob}` as the math's validated `TopK`; what the math
    cannot use (a logprob above 0, NaN, ...) is a bad upstream answer (502)."""
    try:
        return topk_from_mapping(mapping)
    except SamplingError as exc:
        raise UpstreamError(
            f"{upstream} upstream returned unusable logprobs: {exc}", upstream=upstream
        ) from exc


class UpstreamPair:
    """The base and teacher upstreams; `await start()` runs the start-up checks."""

    def __init__(
        self,
        settings: Settings,
        *,
        observer: Observer | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.base = UpstreamClient(
            "base",
            settings.base_url,
            settings,
            model=settings.base_model,
            transport=transport,
            observer=observer,
        )
        self.teacher = UpstreamClient(
            "teacher",
            settings.teacher_url,
            settings,
            model=settings.teacher_model,
            transport=transport,
            observer=observer,
        )
        self.models: dict[str, ModelInfo] = {}
        self.eos_token_ids: frozenset[int] = frozenset()
        # Ids whose text `skip_special_tokens` drops: EOS, the teacher's special added tokens
        # (its /tokenizer_info, when read) and the in-process tokenizer's.
        self.special_ids: frozenset[int] = frozenset()
        self.decoder: Decoder = RemoteDecoder(self.teacher.detokenize)
        if settings.tokenizer is not None:
            self.decoder = self._local_decoder(settings.tokenizer)
        self.token_texts = TokenTextCache(self.decoder)

    async def start(self) -> None:
        """Open both clients and run the start-up checks; a failure closes them and raises
        StartupError (the message names the upstream and the fix).

        While an upstream does not answer (connect error, timeout, 5xx) the checks are retried
        with backoff (logged at WARNING), for at most `Settings.startup_timeout` seconds (None:
        forever; 0: one attempt). An upstream that answers wrongly (another tokenizer, K above
        its limit, no EOS id...) is a configuration error: it fails at once."""
        await self.base.start()
        await self.teacher.start()
        timeout = self.settings.startup_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = _STARTUP_RETRY_SECONDS
        attempt = 1
        try:
            while True:
                try:
                    await self._startup_checks()
                    return
                except StartupError as exc:
                    if not exc.waiting or (
                        deadline is not None and time.monotonic() + delay > deadline
                    ):
                        raise
                    log.warning(
                        "waiting for the upstreams (attempt %d, next in %.1fs): %s",
                        attempt,
                        delay,
                        exc,
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, _STARTUP_RETRY_MAX_SECONDS)
                attempt += 1
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        await self.base.aclose()
        await self.teacher.aclose()

    async def _startup_checks(self) -> None:
        try:
            base_info, teacher_info = await both(self.base.discover(), self.teacher.discover())
            self.models = {"base": base_info, "teacher": teacher_info}
            base_ids, teacher_ids = await both(
                self.base.tokenize(TOKENIZER_PROBE_TEXT, add_special_tokens=False),
                self.teacher.tokenize(TOKENIZER_PROBE_TEXT, add_special_tokens=False),
            )
            if base_ids != teacher_ids:
                at = next(
                    (
                        i
                        for i, (x, y) in enumerate(zip(base_ids, teacher_ids, strict=False))
                        if x != y
                    ),
                    min(len(base_ids), len(teacher_ids)),
                )
                raise StartupError(
                    f"the base ({base_info.name}) and teacher ({teacher_info.name}) tokenizers "
                    f"disagree on the probe text {TOKENIZER_PROBE_TEXT!r} (first difference at "
                    f"token {at}: {base_ids[at : at + 3]} vs {teacher_ids[at : at + 3]}); "
                    "token-id mixing needs two models with the same tokenizer"
                )
            k = self.settings.top_k
            probe = base_ids[:4]  # short: fits any context length
            await both(self.base.check_logprobs(probe, k), self.teacher.check_logprobs(probe, k))
            # check_logprobs read each --max-logprobs into the client's info.
            self.models = {
                "base": self.base.info or base_info,
                "teacher": self.teacher.info or teacher_info,
            }
            self.eos_token_ids = await self._eos_ids()
            self.special_ids |= self.eos_token_ids
            if isinstance(self.decoder, LocalDecoder):
                self.special_ids |= self.decoder.special_ids()
            await self._check_decoder(teacher_ids)
        except UpstreamError as exc:
            client = self.base if exc.upstream == "base" else self.teacher
            hint = ""
            if isinstance(exc, UpstreamUnavailableError):
                hint = f"; is vLLM running there? (DUAL_VLLM_{client.name.upper()}_URL)"
            urls = ", ".join(map(redact_url, client.urls))
            raise StartupError(
                f"{client.name} upstream ({urls}) failed the start-up checks: {exc.message}{hint}",
                waiting=not isinstance(exc, UpstreamRejectedError),
            ) from exc
        log.info(
            "upstreams ready: base %s (max_model_len %d, max_logprobs %s), teacher %s "
            "(max_model_len %d, max_logprobs %s), K=%d, EOS ids %s",
            self.models["base"].name,
            self.models["base"].max_model_len,
            self.models["base"].max_logprobs,
            self.models["teacher"].name,
            self.models["teacher"].max_model_len,
            self.models["teacher"].max_logprobs,
            self.settings.top_k,
            sorted(self.eos_token_ids),
        )

    async def _eos_ids(self) -> frozenset[int]:
        if self.settings.eos_token_ids:
            return frozenset(self.settings.eos_token_ids)
        info = await self.teacher.tokenizer_info()
        self.special_ids = _special_ids(info)
        eos = info.get("eos_token") if info else None
        if isinstance(eos, dict):  # some tokenizers serialise AddedToken objects
            eos = eos.get("content")
        if not isinstance(eos, str) or not eos:
            raise StartupError(
                "cannot find the teacher's EOS token id: its /tokenizer_info endpoint is "
                + ("missing" if info is None else "without eos_token")
                + "; set DUAL_VLLM_EOS_TOKEN_IDS (comma-separated ids) or start the teacher "
                "vLLM with --enable-tokenizer-info-endpoint"
            )
        ids = await self.teacher.tokenize(eos, add_special_tokens=False)
        if len(ids) != 1:
            raise StartupError(
                f"the teacher's eos_token {eos!r} tokenizes to {ids}, not one id; set "
                "DUAL_VLLM_EOS_TOKEN_IDS"
            )
        return frozenset(ids)

    async def _check_decoder(self, ids: list[int]) -> None:
        """An in-process tokenizer must decode like the teacher's own (DUAL_VLLM_TOKENIZER
        pointing at another model's tokenizer would silently change every text)."""
        if isinstance(self.decoder, LocalDecoder):
            probe = [*ids, *sorted(self.eos_token_ids)]
            local, remote = self.decoder.decode_now(probe), await self.teacher.detokenize(probe)
            if local != remote:
                raise StartupError(
                    f"the tokenizer at DUAL_VLLM_TOKENIZER={str(self.decoder.path)!r} decodes "
                    f"the probe ids to {local!r} but the teacher to {remote!r}: point it at the "
                    "teacher's own tokenizer (or unset it to use the teacher's /detokenize)"
                )

    async def ready(self) -> bool:
        """Each upstream has at least one replica answering /health (for GET /ready)."""
        base_ok, teacher_ok = await both(self.base.health(), self.teacher.health())
        return base_ok and teacher_ok

    async def probe(
        self, base_ctx: Sequence[int], teacher_ctx: Sequence[int], k: int, affinity: int
    ) -> tuple[TopK, TopK]:
        """Both upstreams' next-token top-K of their own context, in parallel (a failure
        cancels the sibling call)."""
        base, teacher = await both(
            self.base.topk(base_ctx, k, affinity=affinity),
            self.teacher.topk(teacher_ctx, k, affinity=affinity),
        )
        return to_topk(base, "base"), to_topk(teacher, "teacher")

    async def score_one(self, role: str, context: Sequence[int], k: int, affinity: int) -> TopK:
        """One upstream's next-token top-K after `context` (a speculative round's scoring of a
        drafted prefix, docs/ALGORITHM.md §8; coalesced with other probes like any probe)."""
        client = self.base if role == "base" else self.teacher
        return to_topk(await client.topk(context, k, affinity=affinity), role)

    async def detokenize(self, ids: Sequence[int]) -> str:
        """The teacher's text of `ids` (the gateway's output text; app/detok.py)."""
        return await self.decoder.decode(ids)

    def incremental_text(self) -> IncrementalText:
        """A sequence's text kept up to date decoding only recent ids (app/detok.py)."""
        return IncrementalText(self.decoder)

    @staticmethod
    def _local_decoder(path: str) -> LocalDecoder:
        try:
            return LocalDecoder(path)
        except Exception as exc:  # a missing file, a broken tokenizer.json, no `tokenizers`
            raise StartupError(
                f"cannot load the teacher's tokenizer from DUAL_VLLM_TOKENIZER={path!r}: {exc}"
            ) from exc


def _special_ids(info: dict[str, Any] | None) -> frozenset[int]:
    """The special ids of a /tokenizer_info body's `added_tokens_decoder` (none if absent)."""
    added = info.get("added_tokens_decoder") if info else None
    if not isinstance(added, dict):
        return frozenset()
    return frozenset(
        int(key)
        for key, token in added.items()
        if key.isdigit() and isinstance(token, dict) and token.get("special") is True
    )
