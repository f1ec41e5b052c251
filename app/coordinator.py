"""The generation loop: steps of each sequence (app/rounds.py), stop rules, events.

`Coordinator` is the engine's front door for HTTP, batch and library callers. It owns an
`UpstreamPair` (app/pair.py: both clients, start-up checks, the probe), builds prompts with
app/prompts.py, validates with app/plan.py, and runs every choice (prompt × n) as a sequence:
each step asks both upstreams in parallel for the next-token top-K of their own context and
mixes them (app/sampling, docs/ALGORITHM.md), or, with `speculative`, runs a round that makes
several tokens (§8; app/rounds.py owns both); the loop appends each sampled id to both contexts
(ids, never text) and applies the stop rules token by token. No HTTP-server or SSE code lives
here: routes and the batch job consume `Event`s or `Completion`s (app/generation.py).

Stop rules, in the order they are checked after each token (vLLM's semantics,
docs/VLLM_API.md):

1. the teacher's EOS (unless `ignore_eos`): finish "stop", stop_reason None; the EOS id is in
   `token_ids`, its text is not;
2. `stop_token_ids`: "stop", stop_reason = the id; its text only with
   `include_stop_str_in_output`;
3. stop strings, matched on the detokenized text (app/textrelease.py): "stop", stop_reason =
   the string; the token that completed it stays in `token_ids`; with `min_tokens`, only
   after that many tokens and only a stop string ending in the text after them (vLLM's);
4. `max_tokens`, then the context: "length". The context limit is the smaller of both
   upstreams' `max_model_len` minus their own prompt length.

(With `skip_special_tokens`, vLLM's default, no special id adds text: EOS generated under
`ignore_eos`, `<|im_start|>`, ...; the ids stay in `token_ids`.)

Text: the teacher tokenizer's decoding of the generated ids (app/detok.py: in process with
DUAL_VLLM_TOKENIZER, else the teacher's `/detokenize`). While streaming (or when stop strings
need it) the text is updated after every token from a bounded window of recent ids,
concurrently with the next step's probes so it adds no latency, and released by
`TextRelease`; otherwise the ids are decoded once at the end. Either way the concatenated
event texts equal `Completion.text`, which equals the decoded ids (without a final EOS / stop
id, and cut at a stop string).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import zlib
from collections.abc import AsyncGenerator, Callable, Sequence

import httpx
import numpy as np

from app.diagnostics import summary as diagnostics_summary
from app.generation import (
    MAX_LOGPROBS,
    ChatMessage,
    ChatTemplate,
    Completion,
    DualPrompt,
    Event,
    FinishEvent,
    FinishReason,
    GenerationParams,
    Observer,
    TokenEvent,
    fold,
)
from app.pair import UpstreamPair
from app.plan import Plan, check_request, make_plan
from app.prompts import PromptBuilder, PromptInput, render_base_chat
from app.rounds import RoundPolicy, SequenceState, plain_step, speculative_round
from app.sampling import make_generators, top_logprobs, warm_up
from app.sampling.types import StepResult
from app.settings import Settings
from app.tasks import cancel, task_group
from app.textrelease import TextRelease
from app.upstream import ModelInfo, StartupError, UpstreamClient

__all__ = [
    "MAX_LOGPROBS",
    "ChatMessage",
    "ChatTemplate",
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
    "fold",
    "render_base_chat",
    "task_group",
]

log = logging.getLogger(__name__)

Emit = Callable[[Event], None]


def _affinity(prompt: Sequence[int], sample_index: int) -> int:
    """A stable replica key per sequence: same prompt and sample index, same replica."""
    return zlib.crc32(np.asarray(prompt, dtype=np.int64).tobytes()) + sample_index


class Coordinator:
    """The engine; `async with Coordinator(settings) as coord: ...`.

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
        self.pair = UpstreamPair(settings, observer=observer, transport=transport)
        self.prompts = PromptBuilder(self.pair)
        self.token_texts = self.pair.token_texts
        self._slots = asyncio.Semaphore(settings.max_concurrent_sequences)
        self._lanes = itertools.count()
        self._running = 0  # sequences generating now (a round's scorer lookahead)
        self._started = False

    @property
    def base(self) -> UpstreamClient:
        return self.pair.base

    @property
    def teacher(self) -> UpstreamClient:
        return self.pair.teacher

    @property
    def models(self) -> dict[str, ModelInfo]:
        return self.pair.models

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.pair.eos_token_ids

    # --- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Coordinator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Compile the math, open both clients and run the start-up checks (StartupError)."""
        # Compile the mixing kernel (or load numba's cache) before the first request; in a
        # thread, so a cold compile (seconds) does not stall the caller's event loop.
        await asyncio.to_thread(warm_up)
        await self.pair.start()
        self._started = True

    async def aclose(self) -> None:
        self._started = False
        await self.pair.aclose()

    async def ready(self) -> bool:
        """Both upstreams answer (for GET /ready)."""
        return self._started and await self.pair.ready()

    # --- prompts and checks ------------------------------------------------------------------

    async def completion_prompts(
        self, prompt: PromptInput, base_prompt: PromptInput | None = None
    ) -> list[DualPrompt]:
        """Tokenize text prompts on each upstream (ids pass through); app/prompts.py."""
        return await self.prompts.completion_prompts(prompt, base_prompt)

    async def chat_prompt(
        self,
        messages: Sequence[ChatMessage],
        base_messages: Sequence[ChatMessage] | None = None,
        base_prompt: str | list[int] | None = None,
        template: ChatTemplate | None = None,
    ) -> DualPrompt:
        """The teacher's chat template (with `template`'s options) and the base's prompt;
        app/prompts.py."""
        return await self.prompts.chat_prompt(messages, base_messages, base_prompt, template)

    def check(self, params: GenerationParams, prompts: int) -> None:
        """The request-level checks of app/plan.py, before any prompt is tokenized (the HTTP
        layer calls it first so a bad request costs no upstream call)."""
        check_request(self.settings, params, prompts)

    def _plan(
        self, prompts: Sequence[DualPrompt], params: GenerationParams, *, incremental: bool
    ) -> Plan:
        if not self._started:
            raise RuntimeError("Coordinator used outside `async with` (not started)")
        return make_plan(
            self.settings,
            self.models,
            self.eos_token_ids,
            prompts,
            params,
            incremental=incremental,
            special_ids=self.pair.special_ids,
        )

    # --- generation --------------------------------------------------------------------------

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
        async with contextlib.aclosing(self._events(plan)) as events:
            return await fold(events, plan.prompts, params, token_text=token_text)

    async def _events(self, plan: Plan) -> AsyncGenerator[Event, None]:
        """Run every choice in a background task; yield their events from a queue. Closing
        this generator (the consumer stopped or was cancelled) cancels that task and with it
        every upstream call of the request. Every event queued before a failure is yielded
        before the failure is re-raised."""
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        runner = asyncio.create_task(self._run(plan, queue.put_nowait))
        runner.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (event := await queue.get()) is not None:
                yield event
            runner.result()  # re-raise the request's failure (a typed error) here
        finally:
            await cancel(runner)

    async def _run(self, plan: Plan, emit: Emit) -> None:
        n = plan.params.n
        rngs = make_generators(plan.params.seed, len(plan.prompts) * n)
        async with task_group() as group:
            for index, rng in enumerate(rngs):
                group.create_task(self._choice(plan, index, rng, emit))

    async def _choice(self, plan: Plan, index: int, rng: np.random.Generator, emit: Emit) -> None:
        n = plan.params.n
        prompt = plan.prompts[index // n]
        context_budget = min(
            self.models["teacher"].max_model_len - len(prompt.teacher),
            self.models["base"].max_model_len - len(prompt.base),
        )
        max_tokens = plan.params.max_tokens
        spec = plan.params.speculative
        seq = SequenceState(
            index=index,
            prompt_tokens=len(prompt.teacher),
            teacher_ctx=list(prompt.teacher),
            base_ctx=list(prompt.base),
            budget=context_budget if max_tokens is None else min(max_tokens, context_budget),
            rng=rng,
            affinity=_affinity(prompt.teacher, index % n),
            text=TextRelease(plan.stops, include_stop=plan.params.include_stop_str_in_output),
            decoded=self.pair.incremental_text(),
            prompt_ids=frozenset(prompt.teacher),
            # A tolerance needs fetches between the views and the draw: token by token then.
            policy=None
            if spec is None or plan.params.max_uncertain_mass is not None
            else RoundPolicy(spec, index=self._lane(plan, index)),
        )
        async with self._slots:
            self._running += 1
            try:
                await self._generate(plan, seq, emit)
            finally:
                self._running -= 1

    def _lane(self, plan: Plan, index: int) -> int:
        """A sequence's number for the drafter's load balance (app/rounds.py): successive
        sequences alternate where either drafter will do, across requests too (8 concurrent
        one-choice requests split the drafting 4/4). Seeded: a function of the seed and the
        choice, so the request drafts with the same models and stays reproducible."""
        seed = plan.params.seed
        return next(self._lanes) if seed is None else seed + index

    async def _step(self, plan: Plan, seq: SequenceState) -> list[StepResult]:
        """One step of one sequence (app/rounds.py): a token-by-token step, or a speculative
        round of docs/ALGORITHM.md §8 (several tokens)."""
        started = time.perf_counter()
        if seq.policy is None:
            results = [await plain_step(self.pair, plan, seq)]
        else:
            results = await speculative_round(
                self.pair, plan, seq, seq.policy, running=self._running
            )
        if self.observer is not None:
            seconds = (time.perf_counter() - started) / len(results)
            for result in results:
                self.observer.step(result, seconds)
        return results

    async def _generate(self, plan: Plan, seq: SequenceState, emit: Emit) -> None:
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
                    finish, stop_reason, adds_text = self._accept(plan, seq, result)
                    if finish is None and position == len(results) - 1:
                        # Start the next step's probes now: detokenizing this token runs
                        # concurrently with them instead of before them.
                        next_step = asyncio.create_task(self._step(plan, seq))
                    released = ""
                    if plan.incremental and adds_text:
                        text = await seq.decoded.text(seq.text_ids)
                        hit = None
                        if len(seq.generated) > plan.params.min_tokens:
                            hit = seq.text.find_stop(text, seq.stop_floor)
                        else:  # vLLM: no stop string within the first min_tokens tokens
                            seq.stop_floor = len(text)
                        if hit is not None:
                            cut, stop = hit
                            text = text[:cut]
                            finish, stop_reason = "stop", stop  # `finally` cancels next_step
                        seq.last_text = text
                        released = (
                            seq.text.release(text) if finish is None else seq.text.flush(text)
                        )
                    emit(self._token_event(plan, seq, result, released))
                    if finish is not None:
                        await self._finish(plan, seq, finish, stop_reason, emit)
                        return
        finally:
            if next_step is not None:
                await cancel(next_step)

    @staticmethod
    def _accept(
        plan: Plan, seq: SequenceState, result: StepResult
    ) -> tuple[FinishReason | None, int | str | None, bool]:
        """Append the sampled id; the stop rules decided by the id alone: (finish reason,
        stop reason, whether the id contributes text)."""
        y = result.token_id
        seq.generated.append(y)
        seq.counts[y] = seq.counts.get(y, 0) + 1
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
            adds_text = plan.params.include_stop_str_in_output
        if adds_text and y in plan.silent_ids:  # skip_special_tokens
            adds_text = False
        if adds_text:
            seq.text_ids.append(y)
        if finish is None and len(seq.generated) >= seq.budget:
            finish = "length"
        return finish, stop_reason, adds_text

    @staticmethod
    def _token_event(plan: Plan, seq: SequenceState, result: StepResult, text: str) -> TokenEvent:
        n = plan.params.logprobs
        return TokenEvent(
            index=seq.index,
            token_id=result.token_id,
            text=text,
            step=result,
            top_logprobs=top_logprobs(result, n) if n is not None else None,
        )

    async def _finish(
        self,
        plan: Plan,
        seq: SequenceState,
        finish: FinishReason,
        stop_reason: int | str | None,
        emit: Emit,
    ) -> None:
        if plan.incremental:
            text = seq.last_text
        else:
            ids = seq.text_ids
            text = await self.pair.detokenize(ids) if ids else ""
        rest = seq.text.flush(text)  # what is still held back (all of it if not incremental)
        emit(
            FinishEvent(
                index=seq.index,
                text=rest,
                finish_reason=finish,
                stop_reason=stop_reason,
                prompt_tokens=seq.prompt_tokens,
                completion_tokens=len(seq.generated),
            )
        )
