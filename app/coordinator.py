"""The generation loop: per-step fan-out to both upstreams, the math, stop rules, events.

`Coordinator` owns both upstream clients (app/upstream.py). For every choice (prompt × n) it
runs a sequence: each step asks both upstreams in parallel for the next-token top-K of their
own context (a failure cancels the sibling call), mixes them (app.sampling, ALGORITHM.md),
appends the sampled id to both contexts (ids, never text) and applies the stop rules. No
HTTP-server or SSE code lives here (STYLE.md): routes and the batch job consume `Event`s or
`Completion`s.

Stop rules, in the order they are checked after each token (vLLM's semantics,
../shared/reference/vllm-api.md §2.5):

1. the teacher's EOS (unless `ignore_eos`): finish "stop", stop_reason None; the EOS id is in
   `token_ids`, its text is not;
2. `stop_token_ids`: "stop", stop_reason = the id; its text only with
   `include_stop_str_in_output`;
3. stop strings, matched on the detokenized text: "stop", stop_reason = the string; the text is
   cut before the string (after it with `include_stop_str_in_output`); the token that
   completed it stays in `token_ids`;
4. `max_tokens`, then the context: "length". The context limit is the smaller of both
   upstreams' `max_model_len` minus their own prompt length (a probe needs at least one free
   position, so a prompt of `max_model_len` tokens is a ContextLengthError).

Text: the teacher's `/detokenize` of the generated ids. While streaming (or when stop strings
need it) the text is detokenized after every token, concurrently with the next step's
probes so it adds no latency, and released only up to what cannot change: a trailing
"\\ufffd" (an incomplete UTF-8 character) and a suffix that may start a stop string are held
back. Otherwise the ids are detokenized once at the end. Either way the concatenated event
texts equal `Completion.text`, which equals the detokenized ids (without a final EOS / stop id,
and cut at a stop string).

EOS ids: `Settings.eos_token_ids` if set; else the teacher's `GET /tokenizer_info` (vLLM with
`--enable-tokenizer-info-endpoint`) gives `eos_token`, which the teacher's `/tokenize`
(without special tokens) turns into its id; else the coordinator refuses to start with a
StartupError that says to set DUAL_VLLM_EOS_TOKEN_IDS or enable that endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import numpy as np

from app.diagnostics import summary as diagnostics_summary
from app.errors import (
    ContextLengthError,
    InvalidRequestError,
    UpstreamError,
    UpstreamUnavailableError,
)
from app.generation import (
    MAX_LOGPROBS,
    ChatMessage,
    Completion,
    DualPrompt,
    Event,
    FinishEvent,
    FinishReason,
    GenerationParams,
    Observer,
    TokenEvent,
)
from app.sampling import make_generators, mix_step, top_logprobs, validate_config, warm_up
from app.sampling.types import SamplingError, StepResult, TopK
from app.settings import Settings
from app.upstream import ModelInfo, StartupError, UpstreamClient

__all__ = [
    "ChatMessage",
    "Completion",
    "Coordinator",
    "DualPrompt",
    "Event",
    "FinishEvent",
    "FinishReason",
    "GenerationParams",
    "ModelInfo",
    "Observer",
    "StartupError",
    "TokenEvent",
    "diagnostics_summary",
    "task_group",
]

log = logging.getLogger(__name__)

# Probe text of the start-up tokenizer check: ASCII, accents, a multi-byte symbol, CJK, digits
# and whitespace, so two different vocabularies almost surely split it differently.
TOKENIZER_PROBE_TEXT = "Hello, world! Héllo wörld — 123 ✓ 日本語\n  tab\tend."

T = TypeVar("T")
U = TypeVar("U")


def render_base_chat(settings: Settings, messages: Sequence[ChatMessage]) -> str:
    """The base model's plain rendering of chat messages (Settings.base_*_format); the batch
    job renders its datasets' conversations with it too."""
    formats = {
        "system": settings.base_system_format,
        "developer": settings.base_system_format,
        "user": settings.base_user_format,
        "assistant": settings.base_assistant_format,
    }
    return "".join(
        formats.get(m.role, settings.base_user_format).format(content=m.content) for m in messages
    )


# --- helpers -------------------------------------------------------------------------------


def _leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception to re-raise from a TaskGroup: the first that is not a cancellation."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    for exc in leaves:
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return leaves[0] if leaves else group


@contextlib.asynccontextmanager
async def task_group() -> AsyncIterator[asyncio.TaskGroup]:
    """An `asyncio.TaskGroup` whose first failure cancels the other tasks and is re-raised as
    itself (not as an ExceptionGroup, so callers and the error table see the typed error)."""
    try:
        async with asyncio.TaskGroup() as group:
            yield group
    except BaseExceptionGroup as exc:
        raise _leaf(exc) from None


async def both(a: Coroutine[Any, Any, T], b: Coroutine[Any, Any, U]) -> tuple[T, U]:
    """Run two calls concurrently (`task_group`: the first failure cancels the other)."""
    async with task_group() as group:
        task_a = group.create_task(a)
        task_b = group.create_task(b)
    return task_a.result(), task_b.result()


async def _cancel(task: asyncio.Task[Any]) -> None:
    """Cancel `task`, wait for it to end, and retrieve its outcome (no "never retrieved" log)."""
    task.cancel()
    await asyncio.wait([task])
    if not task.cancelled():
        task.exception()


def _affinity(prompt: Sequence[int], sample_index: int) -> int:
    """A stable replica key per sequence: same prompt and sample index, same replica."""
    return zlib.crc32(np.asarray(prompt, dtype=np.int64).tobytes()) + sample_index


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


def _check_ids(ids: Sequence[int], param: str) -> list[int]:
    if not ids:
        raise InvalidRequestError("the prompt is empty", param=param)
    for token_id in ids:
        if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
            raise InvalidRequestError(f"invalid token id {token_id!r} in the prompt", param=param)
    return list(ids)


# --- one sequence ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Plan:
    """A validated request."""

    prompts: list[DualPrompt]
    params: GenerationParams
    k: int
    eos: frozenset[int]
    stop_ids: frozenset[int]
    stops: tuple[str, ...]
    incremental: bool


@dataclass(slots=True)
class _Sequence:
    index: int
    prompt_index: int
    prompt_tokens: int
    teacher_ctx: list[int]
    base_ctx: list[int]
    budget: int  # most tokens this sequence may generate (max_tokens and the context)
    rng: np.random.Generator
    affinity: int
    generated: list[int] = field(default_factory=list)
    alpha: float | None = None
    released: int = 0  # characters of text already sent in events
    scanned: int = 0  # text before this offset holds no stop string


class Coordinator:
    """Owns both upstream clients; `async with Coordinator(settings) as coord: ...`.

    `transport` (an httpx transport, e.g. tests.fakes.pair_transport) replaces the network
    for in-process tests; `observer` receives upstream-call and step timings (app.metrics).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        observer: Observer | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.observer = observer
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
        self._slots = asyncio.Semaphore(settings.max_concurrent_sequences)
        self.models: dict[str, ModelInfo] = {}
        self.eos_token_ids: frozenset[int] = frozenset()
        self._started = False

    # --- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Coordinator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Open both clients and run the start-up checks; a failure closes them and raises
        StartupError (the message names the upstream and the fix)."""
        # Compile the mixing kernel (or load numba's cache) before the first request; in a
        # thread, so a cold compile (seconds) does not stall the caller's event loop.
        await asyncio.to_thread(warm_up)
        await self.base.start()
        await self.teacher.start()
        try:
            await self._startup_checks()
        except BaseException:
            await self.aclose()
            raise
        self._started = True

    async def aclose(self) -> None:
        self._started = False
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
            self.eos_token_ids = await self._eos_ids()
        except UpstreamError as exc:
            client = self.base if exc.upstream == "base" else self.teacher
            hint = ""
            if isinstance(exc, UpstreamUnavailableError):
                hint = f"; is vLLM running there? (DUAL_VLLM_{client.name.upper()}_URL)"
            raise StartupError(
                f"{client.name} upstream ({', '.join(client.urls)}) failed the start-up "
                f"checks: {exc.message}{hint}"
            ) from exc
        log.info(
            "upstreams ready: base %s (max_model_len %d), teacher %s (max_model_len %d), "
            "K=%d, EOS ids %s",
            self.models["base"].name,
            self.models["base"].max_model_len,
            self.models["teacher"].name,
            self.models["teacher"].max_model_len,
            self.settings.top_k,
            sorted(self.eos_token_ids),
        )

    async def _eos_ids(self) -> frozenset[int]:
        if self.settings.eos_token_ids:
            return frozenset(self.settings.eos_token_ids)
        info = await self.teacher.tokenizer_info()
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

    async def ready(self) -> bool:
        """Both upstreams answer (for GET /ready)."""
        if not self._started:
            return False
        base_ok, teacher_ok = await both(self.base.health(), self.teacher.health())
        return base_ok and teacher_ok

    # --- prompts -----------------------------------------------------------------------------

    async def completion_prompts(
        self,
        prompt: str | list[int] | list[str] | list[list[int]],
        base_prompt: str | list[int] | list[str] | list[list[int]] | None = None,
    ) -> list[DualPrompt]:
        """Tokenize text prompts on each upstream (ids pass through)."""
        teachers = self._prompt_list(prompt, "prompt")
        bases = teachers if base_prompt is None else self._prompt_list(base_prompt, "base_prompt")
        if len(bases) != len(teachers):
            raise InvalidRequestError(
                f"base_prompt has {len(bases)} prompts but prompt has {len(teachers)}",
                param="base_prompt",
            )

        async def ids(client: UpstreamClient, item: str | list[int], param: str) -> list[int]:
            if isinstance(item, str):
                if not item:
                    raise InvalidRequestError("the prompt is empty", param=param)
                return await client.tokenize(item, add_special_tokens=True)
            return _check_ids(item, param)

        base_param = "prompt" if base_prompt is None else "base_prompt"
        async with task_group() as group:
            teacher_tasks = [group.create_task(ids(self.teacher, p, "prompt")) for p in teachers]
            base_tasks = [group.create_task(ids(self.base, p, base_param)) for p in bases]
        return [
            DualPrompt(teacher=t.result(), base=b.result())
            for t, b in zip(teacher_tasks, base_tasks, strict=True)
        ]

    @staticmethod
    def _prompt_list(
        prompt: str | list[int] | list[str] | list[list[int]], param: str
    ) -> list[str | list[int]]:
        if isinstance(prompt, str):
            return [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise InvalidRequestError(f"{param} must not be empty", param=param)
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return [[int(p) for p in prompt]]  # type: ignore[arg-type]
        if all(isinstance(p, str) for p in prompt):
            return [str(p) for p in prompt]
        if all(isinstance(p, list) for p in prompt):
            return [list(p) for p in prompt]  # type: ignore[arg-type]
        raise InvalidRequestError(
            f"{param} must be a string, a list of token ids, or a list of either", param=param
        )

    async def chat_prompt(
        self,
        messages: Sequence[ChatMessage],
        base_messages: Sequence[ChatMessage] | None = None,
        base_prompt: str | list[int] | None = None,
    ) -> DualPrompt:
        """Teacher: its own chat template (upstream /tokenize with messages). Base:
        base_prompt, else base_messages or messages rendered with the plain template."""
        if not messages:
            raise InvalidRequestError("messages must not be empty", param="messages")

        async def base_ids() -> list[int]:
            if isinstance(base_prompt, list):
                return _check_ids(base_prompt, "base_prompt")
            if isinstance(base_prompt, str):
                text = base_prompt
            else:
                text = render_base_chat(self.settings, base_messages or messages)
            if not text:
                raise InvalidRequestError("the base prompt is empty", param="base_prompt")
            return await self.base.tokenize(text, add_special_tokens=True)

        teacher, base = await both(
            self.teacher.tokenize_chat([{"role": m.role, "content": m.content} for m in messages]),
            base_ids(),
        )
        return DualPrompt(teacher=teacher, base=base)

    # --- generation --------------------------------------------------------------------------

    def _plan(
        self, prompts: Sequence[DualPrompt], params: GenerationParams, *, incremental: bool
    ) -> _Plan:
        if not self._started:
            raise RuntimeError("Coordinator used outside `async with` (not started)")
        if not prompts:
            raise InvalidRequestError("no prompt given", param="prompt")
        if params.n < 1:
            raise InvalidRequestError("n must be at least 1", param="n")
        if len(prompts) * params.n > self.settings.max_n:
            raise InvalidRequestError(
                f"n × prompts = {len(prompts) * params.n} exceeds the limit of "
                f"{self.settings.max_n}",
                param="n",
            )
        if params.max_tokens is not None and params.max_tokens < 1:
            raise InvalidRequestError("max_tokens must be at least 1", param="max_tokens")
        if params.logprobs is not None and not 0 <= params.logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError(
                f"logprobs must be between 0 and {MAX_LOGPROBS}", param="logprobs"
            )
        k = params.top_k_upstream if params.top_k_upstream is not None else self.settings.top_k
        if k < 1:
            raise InvalidRequestError("mixing.top_k must be at least 1", param="mixing.top_k")
        try:
            validate_config(params.mixing)
        except SamplingError as exc:
            raise InvalidRequestError(str(exc), param="mixing") from exc
        if params.seed is not None and params.seed < 0:
            raise InvalidRequestError("seed must be non-negative", param="seed")
        stops = tuple(s for s in params.stop if s)
        for p in prompts:
            _check_ids(p.teacher, "prompt")
            _check_ids(p.base, "base_prompt")
            for name, ids in (("teacher", p.teacher), ("base", p.base)):
                limit = self.models[name].max_model_len
                if len(ids) >= limit:
                    raise ContextLengthError(
                        f"This model's maximum context length is {limit} tokens. However, "
                        f"your {'base ' if name == 'base' else ''}prompt contains {len(ids)} "
                        "tokens, which leaves no room for output. Please reduce the length "
                        "of the prompt.",
                        param="base_prompt" if name == "base" else "prompt",
                    )
        return _Plan(
            prompts=list(prompts),
            params=params,
            k=k,
            eos=frozenset() if params.ignore_eos else self.eos_token_ids,
            stop_ids=frozenset(params.stop_token_ids),
            stops=stops,
            incremental=incremental or bool(stops),
        )

    def stream(
        self, prompts: Sequence[DualPrompt], params: GenerationParams
    ) -> AsyncGenerator[Event, None]:
        """Events of every choice, interleaved as they happen. Cancelling the consumer
        cancels every upstream call of this request.

        Validation errors (InvalidRequestError, ContextLengthError) are raised by this call,
        before any event; upstream errors are raised from the iteration. It is an async
        generator: `async with contextlib.aclosing(coord.stream(...)) as events` closes it
        (and cancels its upstream calls) as soon as the consumer stops."""
        plan = self._plan(prompts, params, incremental=True)
        return self._events(plan)

    async def generate(
        self,
        prompts: Sequence[DualPrompt],
        params: GenerationParams,
        *,
        token_text: bool = False,
    ) -> list[Completion]:
        """All choices, in index order. With `token_text`, each Completion also holds the text
        each token released (`Completion.token_text`; the text is then detokenized as it is
        generated, as when streaming, instead of once at the end)."""
        plan = self._plan(prompts, params, incremental=token_text)
        n = params.n
        completions: dict[int, Completion] = {}
        texts: dict[int, list[str]] = {}
        want_logprobs = params.logprobs is not None
        for i in range(len(plan.prompts) * n):
            completions[i] = Completion(
                index=i,
                prompt_index=i // n,
                text="",
                token_ids=[],
                finish_reason="length",
                stop_reason=None,
                prompt_tokens=len(plan.prompts[i // n].teacher),
                completion_tokens=0,
                steps=[],
                top_logprobs=[] if want_logprobs else None,
                token_text=[] if token_text else None,
            )
            texts[i] = []
        async with contextlib.aclosing(self._events(plan)) as events:
            async for event in events:
                c = completions[event.index]
                texts[event.index].append(event.text)
                if isinstance(event, TokenEvent):
                    c.token_ids.append(event.token_id)
                    c.steps.append(event.step)
                    if c.top_logprobs is not None and event.top_logprobs is not None:
                        c.top_logprobs.append(event.top_logprobs)
                    if c.token_text is not None:
                        c.token_text.append(event.text)
                else:
                    if c.token_text is not None and event.text:
                        if c.token_text:
                            c.token_text[-1] += event.text
                        else:
                            c.token_text.append(event.text)
                    c.finish_reason = event.finish_reason
                    c.stop_reason = event.stop_reason
                    c.completion_tokens = event.completion_tokens
        for i, c in completions.items():
            c.text = "".join(texts[i])
        return [completions[i] for i in sorted(completions)]

    async def _events(self, plan: _Plan) -> AsyncGenerator[Event, None]:
        """Run every choice in a background task; yield their events from a queue. Closing
        this generator (the consumer stopped or was cancelled) cancels that task and with it
        every upstream call of the request."""
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        runner = asyncio.create_task(self._run(plan, queue.put_nowait))
        runner.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (event := await queue.get()) is not None:
                yield event
            runner.result()  # re-raise the request's failure (a typed error) here
        finally:
            await _cancel(runner)

    async def _run(self, plan: _Plan, emit: Callable[[Event], None]) -> None:
        n = plan.params.n
        rngs = make_generators(plan.params.seed, len(plan.prompts) * n)
        async with task_group() as group:
            for index, rng in enumerate(rngs):
                group.create_task(self._choice(plan, index, rng, emit))

    async def _choice(
        self, plan: _Plan, index: int, rng: np.random.Generator, emit: Callable[[Event], None]
    ) -> None:
        n = plan.params.n
        prompt = plan.prompts[index // n]
        context_budget = min(
            self.models["teacher"].max_model_len - len(prompt.teacher),
            self.models["base"].max_model_len - len(prompt.base),
        )
        max_tokens = plan.params.max_tokens
        budget = context_budget if max_tokens is None else min(max_tokens, context_budget)
        seq = _Sequence(
            index=index,
            prompt_index=index // n,
            prompt_tokens=len(prompt.teacher),
            teacher_ctx=list(prompt.teacher),
            base_ctx=list(prompt.base),
            budget=budget,
            rng=rng,
            affinity=_affinity(prompt.teacher, index % n),
        )
        async with self._slots:
            await self._generate(plan, seq, emit)

    async def _step(self, plan: _Plan, seq: _Sequence) -> list[StepResult]:
        """One step of one sequence: both upstreams' top-K in parallel, then the math.

        Returns the tokens it produced (one today; a speculative round of ALGORITHM.md §8 or a
        certified-support refetch of §9 would grow here, returning several or recomputing).
        """
        started = time.perf_counter()
        base, teacher = await self._probe(plan, seq)
        result = mix_step(
            base,
            teacher,
            plan.params.mixing,
            first_token=not seq.generated,
            rng=seq.rng,
            alpha_hint=seq.alpha,
        )
        if self.observer is not None:
            self.observer.step(result, time.perf_counter() - started)
        return [result]

    async def _probe(self, plan: _Plan, seq: _Sequence) -> tuple[TopK, TopK]:
        return await both(
            self.base.topk(seq.base_ctx, plan.k, affinity=seq.affinity),
            self.teacher.topk(seq.teacher_ctx, plan.k, affinity=seq.affinity),
        )

    async def _generate(self, plan: _Plan, seq: _Sequence, emit: Callable[[Event], None]) -> None:
        params = plan.params
        text_ids: list[int] = []  # generated ids that contribute text
        text = ""  # detokenized text_ids (kept up to date only when incremental)
        # The next step is prefetched while this token is detokenized, as a plain task rather
        # than in a TaskGroup: its failure must surface only when it is awaited, after the
        # token already sampled has been emitted (a sibling failing in a TaskGroup would cancel
        # that emission, and the token would be lost from the stream).
        next_step: asyncio.Task[list[StepResult]] | None = asyncio.create_task(
            self._step(plan, seq)
        )
        try:
            while next_step is not None:
                results = await next_step
                next_step = None
                for position, result in enumerate(results):
                    y = result.token_id
                    seq.generated.append(y)
                    seq.teacher_ctx.append(y)
                    seq.base_ctx.append(y)
                    if result.alpha is not None:
                        seq.alpha = result.alpha
                    finish: FinishReason | None = None
                    stop_reason: int | str | None = None
                    adds_text = True
                    if y in plan.eos:
                        finish, adds_text = "stop", False
                    elif y in plan.stop_ids:
                        finish, stop_reason = "stop", y
                        adds_text = params.include_stop_str_in_output
                    if adds_text:
                        text_ids.append(y)
                    if finish is None and len(seq.generated) >= seq.budget:
                        finish = "length"
                    last = position == len(results) - 1
                    if finish is None and last:
                        # Start the next step's probes now: detokenizing this token runs
                        # concurrently with them instead of before them.
                        next_step = asyncio.create_task(self._step(plan, seq))
                    released = ""
                    if plan.incremental and adds_text:
                        text = await self.teacher.detokenize(text_ids, affinity=seq.affinity)
                        hit = self._find_stop(plan, seq, text)
                        if hit is not None:
                            cut, stop = hit
                            text = text[:cut]
                            finish, stop_reason = "stop", stop  # `finally` cancels next_step
                        if finish is None:
                            released = self._release(plan, seq, text)
                        else:
                            released, seq.released = text[seq.released :], len(text)
                    emit(
                        TokenEvent(
                            index=seq.index,
                            token_id=y,
                            text=released,
                            step=result,
                            top_logprobs=(
                                top_logprobs(result, params.logprobs)
                                if params.logprobs is not None
                                else None
                            ),
                        )
                    )
                    if finish is not None:
                        if not plan.incremental:
                            text = (
                                await self.teacher.detokenize(text_ids, affinity=seq.affinity)
                                if text_ids
                                else ""
                            )
                        emit(
                            FinishEvent(
                                index=seq.index,
                                text=text[seq.released :],
                                finish_reason=finish,
                                stop_reason=stop_reason,
                                prompt_tokens=seq.prompt_tokens,
                                completion_tokens=len(seq.generated),
                            )
                        )
                        seq.released = len(text)
                        return
        finally:
            if next_step is not None:
                await _cancel(next_step)

    @staticmethod
    def _find_stop(plan: _Plan, seq: _Sequence, text: str) -> tuple[int, str] | None:
        """The earliest stop string in the new part of `text`: (where the text ends, it)."""
        if not plan.stops:
            return None
        longest = max(len(s) for s in plan.stops)
        start = max(0, seq.scanned - longest + 1)
        best: tuple[int, str] | None = None
        for stop in plan.stops:
            at = text.find(stop, start)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, stop)
        # A trailing U+FFFD may still become another character: scan it again next time.
        seq.scanned = len(text.rstrip("\ufffd"))
        if best is None:
            return None
        at, stop = best
        cut = at + len(stop) if plan.params.include_stop_str_in_output else at
        return max(cut, seq.released), stop

    @staticmethod
    def _release(plan: _Plan, seq: _Sequence, text: str) -> str:
        """The text that can be sent now: all but a trailing incomplete UTF-8 character and,
        unless the stop string itself is to be output, a suffix that may start a stop string."""
        safe = text.rstrip("\ufffd")
        if plan.stops and not plan.params.include_stop_str_in_output:
            safe = safe[: len(safe) - _held_back(safe, plan.stops)]
        if len(safe) <= seq.released:
            return ""
        released, seq.released = safe[seq.released :], len(safe)
        return released
