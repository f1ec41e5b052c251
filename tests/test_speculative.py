"""Speculative rounds through the engine (docs/ALGORITHM.md §8, app/rounds.py), against the fake
vLLM pair: the law of the first tokens, stop rules inside a round, reproducibility, independent
choices, a failing draft, cancellation and the diagnostics. The law itself, in depth, is
tests/sampling/test_speculative.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from scipy import stats

from app.coordinator import Coordinator, DualPrompt, GenerationParams
from app.generation import Speculative
from app.sampling import MixConfig, TopK, mix
from app.settings import Settings
from tests.fakes import EOS_ID, FakeVLLM, encode
from tests.fakes.vllm import BASE_URL, TEACHER_URL, VOCAB_SIZE, pair_transport

PROMPT = DualPrompt(teacher=encode("Once upon a"), base=encode("Once upon a"))
LIKELY = (100, 101, 102, 103)  # the ids the small-law fakes put their mass on
EXPLORE = MixConfig(force_first_token=False, trust_region_top_p=None, stability_check=False)


def small_law(role: str) -> Callable[[Sequence[int]], npt.NDArray[np.float64]]:
    """Four likely ids whose logits depend on the last token and the role; the rest ~0."""

    def logits(prompt: Sequence[int]) -> npt.NDArray[np.float64]:
        out = np.full(VOCAB_SIZE, -30.0)
        rng = np.random.default_rng([prompt[-1], 1 if role == "teacher" else 2])
        out[list(LIKELY)] = rng.normal(0.0, 1.0, len(LIKELY))
        return out

    return logits


@contextlib.asynccontextmanager
async def engine(base: FakeVLLM, teacher: FakeVLLM, **overrides: Any) -> AsyncIterator[Coordinator]:
    values: dict[str, Any] = {"base_url": [BASE_URL], "teacher_url": [TEACHER_URL], "max_n": 2000}
    values.update(overrides)
    coord = Coordinator(Settings(**values), transport=pair_transport(base=base, teacher=teacher))
    async with coord:
        yield coord


def exact_pairs(
    base: FakeVLLM, teacher: FakeVLLM, config: MixConfig
) -> dict[tuple[int, int], float]:
    """q_1(y1)·q_2(y2 | y1) from the fakes' top-20 views (what the upstreams show)."""

    def q(context: list[int], first: bool) -> dict[int, float]:
        views = [
            TopK(
                ids=np.array([i for i, _ in fake.topk(context, 20)], np.int64),
                logprobs=np.array([lp for _, lp in fake.topk(context, 20)]),
            )
            for fake in (base, teacher)
        ]
        m = mix(views[0], views[1], config, first_token=first)
        return {int(y): float(p) for y, p in zip(m.support, m.q / m.q.sum(), strict=True) if p > 0}

    law: dict[tuple[int, int], float] = {}
    for y1, p1 in q(PROMPT.teacher, True).items():
        for y2, p2 in q([*PROMPT.teacher, y1], False).items():
            law[(y1, y2)] = p1 * p2
    return law


def p_value(counts: Counter[tuple[int, int]], law: dict[tuple[int, int], float]) -> float:
    total = sum(counts.values())
    cells = [c for c in law if law[c] * total >= 5]
    rest = [c for c in law if c not in cells]
    observed = [counts.get(c, 0) for c in cells] + [sum(counts.get(c, 0) for c in rest)]
    expected = [law[c] * total for c in cells] + [sum(law[c] for c in rest) * total]
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    assert sum(observed) == total, "a pair of probability 0 was drawn"
    return float(stats.chisquare(observed, expected).pvalue)


@pytest.mark.parametrize("drafter", ["base", "teacher"])
async def test_the_first_two_tokens_follow_q_through_the_engine(drafter: str) -> None:
    base, teacher = (
        FakeVLLM("base", distribution=small_law("base")),
        FakeVLLM("teacher", distribution=small_law("teacher")),
    )
    params = GenerationParams(
        max_tokens=2,
        n=1500,
        seed=5,
        mixing=EXPLORE,
        speculative=Speculative(k=3, drafter=drafter),  # type: ignore[arg-type]
    )
    async with engine(base, teacher) as coord:
        out = await coord.generate([PROMPT], params)
    counts = Counter((c.token_ids[0], c.token_ids[1]) for c in out)
    assert all(c.steps[0].draft != 0 for c in out)  # every first token came from a round
    assert p_value(counts, exact_pairs(base, teacher, EXPLORE)) > 1e-3


async def test_seeded_rounds_are_reproducible_and_choices_draft_on_their_own() -> None:
    base, teacher = FakeVLLM("base"), FakeVLLM("teacher")
    params = GenerationParams(max_tokens=24, n=3, seed=11, speculative=Speculative(k=4))
    async with engine(base, teacher) as coord:
        first = await coord.generate([PROMPT], params)
        drafts = [r for fake in (base, teacher) for r in fake.requests if r.get("stream")]
        second = await coord.generate([PROMPT], params)
    assert [c.token_ids for c in first] == [c.token_ids for c in second]
    assert len({tuple(c.token_ids) for c in first}) == 3
    seeds = [r["seed"] for r in drafts]
    assert len(seeds) == len(set(seeds))  # no two rounds share a draft's randomness
    assert all(r["top_k"] == 20 and r["top_p"] == 1.0 and r["ignore_eos"] for r in drafts)


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 9])
async def test_max_tokens_holds_inside_a_round(max_tokens: int) -> None:
    base, teacher = FakeVLLM("base"), FakeVLLM("teacher")
    base.eos_after = teacher.eos_after = None
    params = GenerationParams(max_tokens=max_tokens, seed=1, speculative=Speculative(k=8))
    async with engine(base, teacher) as coord:
        (out,) = await coord.generate([PROMPT], params)
    assert len(out.token_ids) == max_tokens
    assert out.finish_reason == "length"


async def test_eos_stop_ids_and_stop_strings_end_the_round() -> None:
    base, teacher = FakeVLLM("base", eos_after=2), FakeVLLM("teacher", eos_after=2)
    spec = Speculative(k=8)
    async with engine(base, teacher) as coord:
        for seed in range(6):
            (out,) = await coord.generate(
                [PROMPT], GenerationParams(max_tokens=60, seed=seed, speculative=spec)
            )
            if out.finish_reason == "stop":
                assert out.token_ids[-1] == EOS_ID
                assert EOS_ID not in out.token_ids[:-1]
            plain = GenerationParams(max_tokens=60, seed=seed, speculative=spec, ignore_eos=True)
            (free,) = await coord.generate([PROMPT], plain)
            stop_id = free.token_ids[3]
            params = GenerationParams(
                max_tokens=60,
                seed=seed,
                speculative=spec,
                ignore_eos=True,
                stop_token_ids=[stop_id],
            )
            (cut,) = await coord.generate([PROMPT], params)
            assert cut.token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1]
            assert cut.stop_reason == stop_id
            word = free.text[5:8]
            params = GenerationParams(
                max_tokens=60, seed=seed, speculative=spec, ignore_eos=True, stop=[word]
            )
            (text,) = await coord.generate([PROMPT], params)
            assert text.text == free.text[: free.text.index(word)]
            assert text.finish_reason == "stop"


async def test_a_failing_draft_falls_back_to_a_plain_step() -> None:
    base, teacher = FakeVLLM("base"), FakeVLLM("teacher")
    teacher.faults.stream_status = 500
    params = GenerationParams(max_tokens=6, seed=2, speculative=Speculative(k=3, drafter="teacher"))
    async with engine(base, teacher) as coord:
        (out,) = await coord.generate([PROMPT], params)
    assert len(out.token_ids) == 6
    assert all(step.draft == 0 for step in out.steps)  # every token from a plain step


async def test_closing_the_stream_aborts_the_draft() -> None:
    base, teacher = FakeVLLM("base"), FakeVLLM("teacher")
    base.eos_after = teacher.eos_after = None
    teacher.faults.token_latency = 0.05
    params = GenerationParams(max_tokens=200, speculative=Speculative(k=16, drafter="teacher"))
    async with engine(base, teacher) as coord:
        async with contextlib.aclosing(coord.stream([PROMPT], params)) as events:
            async for _ in events:
                break
        for _ in range(100):
            if teacher.in_flight == 0 and base.in_flight == 0:
                break
            await asyncio.sleep(0.02)
        assert teacher.in_flight == 0
        assert base.in_flight == 0


async def test_diagnostics_of_rounds() -> None:
    base, teacher = FakeVLLM("base"), FakeVLLM("teacher")
    base.eos_after = teacher.eos_after = None
    params = GenerationParams(max_tokens=30, seed=4, speculative=Speculative(k=4))
    async with engine(base, teacher) as coord:
        (out,) = await coord.generate([PROMPT], params)
        (plain,) = await coord.generate([PROMPT], GenerationParams(max_tokens=30, seed=4))
    draft = Counter(step.draft for step in out.steps)
    summary = out.summary
    assert summary["acceptance_rate"] == pytest.approx(draft[1] / (draft[1] + draft[2]))
    rounds = draft[2] + draft[3] + (1 if out.steps[-1].draft == 1 else 0)
    # The last token is a plain step when a round has no room for a draft (k + 1 > what is left).
    assert summary["tokens_per_round"] == pytest.approx((30 - draft[0]) / rounds)
    assert summary["requests_per_token"] == pytest.approx(
        (rounds + 30 - draft[0] + 2 * draft[0]) / 30
    )
    assert plain.summary["requests_per_token"] == 2.0
    assert plain.summary["acceptance_rate"] is None


async def test_a_scorer_failing_mid_round_keeps_the_judged_tokens() -> None:
    base, teacher = FakeVLLM("base"), FakeVLLM("teacher")
    base.eos_after = teacher.eos_after = None
    # The base scores (the teacher drafts); without retries its 6th call, a view in the middle
    # of the second round (for this seed), fails: the tokens judged before it are kept and the
    # next step goes on (a round-start view failing would fail the request, as a plain step).
    base.faults.status, base.faults.status_after, base.faults.status_count = 500, 5, 1
    params = GenerationParams(
        max_tokens=12, seed=6, speculative=Speculative(k=8, drafter="teacher")
    )
    async with engine(base, teacher, upstream_retries=0) as coord:
        (out,) = await coord.generate([PROMPT], params)
    assert len(out.token_ids) == 12
    assert base.faults.status_after + base.faults.status_count <= base.completions_started
