"""One sequence's state and its steps: token by token, or speculative rounds (docs/ALGORITHM.md
§8).

A plain step asks both upstreams for their next-token top-K of their own context, in parallel,
and draws from q. A speculative round streams up to k tokens from the drafter, sampled with a
proposal the gateway can compute (app/upstream.py `draft`), asks the other model for its top-K
after each drafted prefix as it arrives (ordinary probes, coalesced by app/probes.py), and
judges the drafts in order (app/sampling/speculative.py): each position's q
is the plain step's q, with the same fill, temperature, stability check, trust region,
first-token rule, §5a transforms and top_p/top_k, from the same two views; the round ends at
the first rejection (a token drawn from the residual), or after a token that ends the sequence
(EOS, a stop id), or with one more token drawn from q when every draft was accepted. The
tokens are distributed exactly as token by token.

`RoundPolicy` picks each round's drafter and k from what the sequence has seen so far (which
keeps the law exact: a proposal may depend on the past, never on its own draw).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from app.certified import Refinement, readouts
from app.detok import IncrementalText
from app.errors import UpstreamError
from app.generation import MAX_DRAFT_TOKENS, Speculative
from app.pair import UpstreamPair, to_topk
from app.plan import Plan
from app.sampling import mix, sample
from app.sampling.shaping import History, shapes
from app.sampling.speculative import judge, proposal
from app.sampling.types import (
    DRAFT_ACCEPTED,
    DRAFT_BONUS,
    DRAFT_RESAMPLED,
    MixConfig,
    Mixture,
    StepResult,
    TopK,
)
from app.tasks import cancel
from app.textrelease import TextRelease

log = logging.getLogger(__name__)

Role = Literal["base", "teacher"]

# The adaptive k (`RoundPolicy.k`): at per-draft acceptance a, a run of accepted drafts is
# a / (1 − a) long on average; k is twice that (a round cut short by a rejection costs little:
# its draft is aborted and the scorer is at most LOOKAHEAD views ahead), so rounds seldom end
# at k and restart (a new draft request) only when they must.
K_PER_RUN = 2.0
# Scorer views asked for ahead of the judging (`speculative_round`): 3 while few sequences
# run (the scorer is idle otherwise; latency), 1 when the upstreams are shared by more (views
# past a rejection are then compute taken from other sequences).
LOOKAHEAD = 3
LOOKAHEAD_BUSY = 1
BUSY_SEQUENCES = 2
# With "auto", α beyond these bounds picks the drafter (the model q is closer to); between
# them (the Chernoff point: q is as close to either in KL) sequences alternate by index, so
# concurrent sequences share the drafting and the scoring between the two upstreams.
BASE_BELOW, TEACHER_ABOVE = 0.3, 0.7
PRIOR_ACCEPTANCE = 0.8  # before a sequence has judged any draft
ACCEPTANCE_MEMORY = 0.9  # weight of the past in the acceptance's moving average
ALPHA_MEMORY = 0.8  # same for α (the drafter choice)


@dataclass(slots=True)
class SequenceState:
    """One choice being generated (the coordinator's loop state)."""

    index: int
    prompt_tokens: int
    teacher_ctx: list[int]
    base_ctx: list[int]
    budget: int  # most tokens this sequence may generate (max_tokens and the context)
    rng: np.random.Generator
    affinity: int
    text: TextRelease
    decoded: IncrementalText  # the text of text_ids, decoding only recent ids
    generated: list[int] = field(default_factory=list)
    text_ids: list[int] = field(default_factory=list)  # generated ids that contribute text
    last_text: str = ""  # their text as last detokenized (incremental only; cut at a stop)
    alpha: float | None = None  # the last step's α: the solver's warm start
    prompt_ids: frozenset[int] = frozenset()  # the teacher prompt's ids (repetition_penalty)
    counts: dict[int, int] = field(default_factory=dict)  # generated id -> times (penalties)
    stop_floor: int = 0  # a stop string must end after this offset (the min_tokens tokens' text)
    policy: RoundPolicy | None = None  # set when the request asks for speculative rounds


@dataclass(slots=True)
class RoundPolicy:
    """Each round's drafter and k, adapted to the sequence's own observations (§8)."""

    spec: Speculative
    index: int = 0  # the sequence's number in the engine (the drafter's load balance)
    acceptance: float = PRIOR_ACCEPTANCE  # moving average of the per-draft acceptance
    alpha: float | None = None  # moving average of α (steps that have one)

    def drafter(self) -> Role:
        """The fixed drafter, or the model q is clearly closer to (the base when α is low, the
        teacher when high); in between, even sequences draft with the teacher, odd ones with
        the base (load balance)."""
        if self.spec.drafter != "auto":
            return self.spec.drafter
        if self.alpha is None or self.alpha > TEACHER_ABOVE:
            return "teacher"
        if self.alpha < BASE_BELOW:
            return "base"
        return "teacher" if self.index % 2 == 0 else "base"

    def k(self) -> int:
        """The fixed k, or K_PER_RUN times the expected run of accepted drafts."""
        if self.spec.k is not None:
            return self.spec.k
        a = min(max(self.acceptance, 0.0), 0.99)
        return min(MAX_DRAFT_TOKENS, 1 + round(K_PER_RUN * a / (1.0 - a)))

    def observe(self, results: list[StepResult]) -> None:
        for result in results:
            if result.draft in (DRAFT_ACCEPTED, DRAFT_RESAMPLED):  # a judged draft
                accepted = 1.0 if result.draft == DRAFT_ACCEPTED else 0.0
                self.acceptance += (1.0 - ACCEPTANCE_MEMORY) * (accepted - self.acceptance)
            if result.alpha is not None:
                if self.alpha is None:
                    self.alpha = result.alpha
                else:
                    self.alpha += (1.0 - ALPHA_MEMORY) * (result.alpha - self.alpha)


def history(plan: Plan, seq: SequenceState, counts: dict[int, int], done: int) -> History | None:
    """What docs/ALGORITHM.md §5a's penalties and min_tokens read after `done` generated
    tokens; None when the request sets none of them (the step is then the kernel's alone)."""
    held = plan.held_ids if done < plan.params.min_tokens else frozenset()
    if not held and not shapes(plan.params.mixing):
        return None
    return History(prompt=seq.prompt_ids, counts=counts, held=held)


async def plain_step(pair: UpstreamPair, plan: Plan, seq: SequenceState) -> StepResult:
    """Both upstreams' top-K of their own context in parallel, then the math; with a
    `max_uncertain_mass`, more values are fetched until q is within it (app/certified.py)."""
    base, teacher = await pair.probe(seq.base_ctx, seq.teacher_ctx, plan.k, seq.affinity)

    def mixed(base: TopK, teacher: TopK) -> Mixture:
        return mix(
            base,
            teacher,
            plan.params.mixing,
            first_token=not seq.generated,
            alpha_hint=seq.alpha,
            history=history(plan, seq, seq.counts, len(seq.generated)),
        )

    mixture = mixed(base, teacher)
    tolerance = plan.params.max_uncertain_mass
    if tolerance is None:
        return readouts(sample(mixture, seq.rng), base, teacher, mixture, plan)
    refine = Refinement(pair, plan, seq.base_ctx, seq.teacher_ctx, seq.affinity)
    bound = refine.bound(base, teacher, mixture)
    while bound > tolerance:
        views = await refine.more(base, teacher, mixture)
        if views is None:
            break
        base, teacher = views
        mixture = mixed(base, teacher)
        bound = refine.bound(base, teacher, mixture)
    result = sample(mixture, seq.rng)._replace(refetches=refine.fetches)
    return readouts(result, base, teacher, mixture, plan, k=refine.k, bound=bound)


async def speculative_round(
    pair: UpstreamPair,
    plan: Plan,
    seq: SequenceState,
    policy: RoundPolicy,
    *,
    running: int = 1,
) -> list[StepResult]:
    """One round (see the module docstring): 1 to k + 1 tokens, each with `draft` set. The
    sequence's state is not changed here (the coordinator accepts the tokens one by one).

    Pipelined: the draft streams in; the scorer's view after each drafted prefix is asked for
    as soon as that prefix is known (the context's own at once), and each position is judged
    as soon as both views are in. A rejection (or a token that ends the sequence) ends the
    round at once and cancels the rest: the draft's stream is closed (vLLM aborts it) and the
    scorer's pending probes are cancelled. A draft that fails ends the round where it is
    (before its first position: a token-by-token step instead, with its retries); so does a
    scorer view that fails after its retries, once a position was judged."""
    room = seq.budget - len(seq.generated)
    k = min(policy.k(), room - 1)
    if k < 1:
        return [await plain_step(pair, plan, seq)]
    role = policy.drafter()
    mixing = plan.params.mixing
    if role == "base":
        drafter, scorer, own, other = pair.base, "teacher", seq.base_ctx, seq.teacher_ctx
    else:
        drafter, scorer, own, other = pair.teacher, "base", seq.teacher_ctx, seq.base_ctx
    # A seeded request seeds the drafter from its own generator: the same request drafts the
    # same tokens from the same upstream answers. Unseeded, vLLM draws its own.
    seed = None if plan.params.seed is None else int(seq.rng.integers(2**31))
    judge = RoundJudge(
        role,
        plan.k,
        mixing,
        rng=seq.rng,
        done=len(seq.generated),
        alpha=seq.alpha,
        counts=seq.counts,
        history_of=lambda counts, done: history(plan, seq, counts, done),
        ends=plan.eos | plan.stop_ids,
        certify=lambda result, base, teacher, mixture: readouts(
            result, base, teacher, mixture, plan
        ),
    )
    lookahead = LOOKAHEAD if running <= BUSY_SEQUENCES else LOOKAHEAD_BUSY
    scores: list[asyncio.Future[TopK]] = []
    drafts: asyncio.Queue[tuple[int, dict[int, float]] | None] = asyncio.Queue()
    drafted: list[int] = []
    results: list[StepResult] = []

    def score_ahead() -> None:
        """Ask the scorer for its view after each drafted prefix known, at most `lookahead`
        positions ahead of the judging: the scorer is the round's slow side (one partial
        prefill per position), so views of positions after a rejection are work wasted."""
        while len(scores) <= min(len(drafted), k) and len(scores) - len(results) < lookahead:
            prefix = other + drafted[: len(scores)]
            scores.append(
                asyncio.ensure_future(pair.score_one(scorer, prefix, plan.k, seq.affinity))
            )

    async def read() -> None:
        try:
            stream = drafter.draft(
                own, k + 1, plan.k, mixing.temperature, seed=seed, affinity=seq.affinity
            )
            async with contextlib.aclosing(stream) as positions:
                async for token, mapping in positions:
                    drafted.append(token)
                    score_ahead()
                    drafts.put_nowait((token, mapping))
                    if len(drafted) > k:
                        break
        finally:
            drafts.put_nowait(None)

    score_ahead()
    reader = asyncio.ensure_future(read())
    try:
        while (item := await drafts.get()) is not None:
            token, mapping = item
            position = len(results)
            try:
                score = await scores[position]
            except UpstreamError:
                if not results:
                    raise
                break  # the tokens judged so far stand; the next step asks again
            result, more = judge.position(token, to_topk(mapping, role), score, last=position == k)
            results.append(result)
            if not more:
                break
            score_ahead()
        if not results:  # the draft gave nothing: its error, or a step without it
            if reader.done() and reader.exception() is not None:
                log.warning("draft failed, taking a token-by-token step: %s", reader.exception())
            results = [await plain_step(pair, plan, seq)]
    finally:
        await cancel(reader, *scores)
    policy.observe(results)
    return results


class RoundJudge:
    """The positions of one round, judged in order (pure; docs/ALGORITHM.md §8).

    `done` tokens were generated before the round (the first-token rule, min_tokens),
    `counts` are their ids (penalties), `alpha` the last α (the solver's warm start); tokens in
    `ends` (EOS, stop ids) end the round."""

    def __init__(
        self,
        role: Role,
        k: int,
        mixing: MixConfig,
        *,
        rng: np.random.Generator,
        done: int,
        alpha: float | None,
        counts: Mapping[int, int],
        history_of: Callable[[dict[int, int], int], History | None],
        ends: Collection[int],
        certify: Callable[[StepResult, TopK, TopK, Mixture], StepResult] | None = None,
    ) -> None:
        self.certify = certify
        self.role = role
        self.k = k
        self.mixing = mixing
        self.rng = rng
        self.done = done
        self.alpha = alpha
        self.counts = dict(counts)
        self.history_of = history_of
        self.ends = ends

    def position(
        self, token: int, view: TopK, score: TopK, *, last: bool
    ) -> tuple[StepResult, bool]:
        """The token at the next position, from the drafted id and the drafter's view it was
        drawn from, and the scorer's view of the same prefix; whether the round goes on. The
        `last` position's draft is not judged: its token is drawn from q."""
        base, teacher = (view, score) if self.role == "base" else (score, view)
        mixture = mix(
            base,
            teacher,
            self.mixing,
            first_token=self.done == 0,
            alpha_hint=self.alpha,
            history=self.history_of(self.counts, self.done),
        )
        if last:
            result, accepted = sample(mixture, self.rng)._replace(draft=DRAFT_BONUS), False
        else:
            ids, probs = proposal(view, self.k, self.mixing.temperature, token)
            result, accepted = judge(mixture, token, ids, probs, self.rng)
        if self.certify is not None:
            result = self.certify(result, base, teacher, mixture)
        y = result.token_id
        self.done += 1
        self.counts[y] = self.counts.get(y, 0) + 1
        if result.alpha is not None:
            self.alpha = result.alpha
        return result, accepted and y not in self.ends


def judge_round(
    drafts: Sequence[tuple[int, TopK]],
    scores: Sequence[TopK],
    judge: RoundJudge,
) -> list[StepResult]:
    """A whole round from its upstream answers: `drafts[i]` is the drafted id at position i
    and the drafter's view it was drawn from, `scores[i]` the scorer's view after the same
    prefix; the last position is drawn from q."""
    results: list[StepResult] = []
    last = len(drafts) - 1
    for i, ((token, view), score) in enumerate(zip(drafts, scores, strict=True)):
        result, more = judge.position(token, view, score, last=i == last)
        results.append(result)
        if not more:
            break
    return results
