"""Certified support in the engine (docs/ALGORITHM.md §9, app/certified.py) against the fakes,
whose full distributions are known: the per-token bound holds against the full-vocabulary q*,
and with a tolerance every token ends within it (fetching exact values, then a larger K)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from app.coordinator import Coordinator, DualPrompt, GenerationParams
from app.generation import Speculative
from app.sampling import MixConfig, TopK, mix
from app.sampling.types import StepResult
from app.settings import Settings
from tests.fakes import FakeVLLM, encode
from tests.fakes.vllm import BASE_URL, TEACHER_URL, VOCAB_SIZE, pair_transport

PROMPT = DualPrompt(teacher=encode("The lighthouse"), base=encode("The lighthouse"))


@contextlib.asynccontextmanager
async def engine(base: FakeVLLM, teacher: FakeVLLM) -> AsyncIterator[Coordinator]:
    settings = Settings(base_url=[BASE_URL], teacher_url=[TEACHER_URL])
    coord = Coordinator(settings, transport=pair_transport(base=base, teacher=teacher))
    async with coord:
        yield coord


def full_view(fake: FakeVLLM, context: list[int]) -> TopK:
    lp = fake.logprobs(context)
    return TopK(ids=np.arange(VOCAB_SIZE, dtype=np.int64), logprobs=np.maximum(lp, -9999.0))


def tv_to_full(
    step: StepResult,
    base: FakeVLLM,
    teacher: FakeVLLM,
    context: list[int],
    config: MixConfig,
    first: bool,
) -> float:
    star = mix(full_view(base, context), full_view(teacher, context), config, first_token=first)
    q_star = dict(zip(star.support.tolist(), (star.q / star.q.sum()).tolist(), strict=True))
    q = dict(zip(step.support.tolist(), np.exp(step.logq).tolist(), strict=True))
    return 0.5 * float(sum(abs(q.get(i, 0.0) - q_star.get(i, 0.0)) for i in set(q) | set(q_star)))


def fakes(**kwargs: Any) -> tuple[FakeVLLM, FakeVLLM]:
    return FakeVLLM("base", **kwargs), FakeVLLM("teacher", **kwargs)


@pytest.mark.parametrize(
    "config",
    [
        MixConfig(),
        MixConfig(force_first_token=False, trust_region_top_p=None, stability_check=False),
        MixConfig(temperature=0.7, trust_region_top_p=0.9),
    ],
    ids=["balanced", "explore", "cool"],
)
async def test_the_bound_holds_and_a_tolerance_is_met(config: MixConfig) -> None:
    base, teacher = fakes(max_logprobs=1024)
    base.eos_after = teacher.eos_after = None
    async with engine(base, teacher) as coord:
        plain = GenerationParams(max_tokens=8, n=3, seed=3, mixing=config, diagnostics=True)
        strict = GenerationParams(
            max_tokens=8, n=3, seed=3, mixing=config, diagnostics=True, max_uncertain_mass=0.02
        )
        loose, tight = await coord.generate([PROMPT], plain), await coord.generate([PROMPT], strict)
    refetched = 0
    for runs, tolerance in ((loose, None), (tight, 0.02)):
        for completion in runs:
            for i, step in enumerate(completion.steps):
                context = PROMPT.teacher + completion.token_ids[:i]
                tv = tv_to_full(step, base, teacher, context, config, first=i == 0)
                assert step.uncertain_mass is not None
                assert tv <= step.uncertain_mass + 1e-9
                assert step.base_logprob is not None
                assert step.teacher_logprob is not None
                if tolerance is None:
                    assert step.certified is None
                    assert step.refetches == 0
                else:
                    assert step.certified is True  # the fakes allow K up to their vocabulary
                    assert step.uncertain_mass <= tolerance
                    refetched += step.refetches > 0
    assert refetched > 0  # K = 20 alone was not enough: the tolerance made steps fetch more
    # Fetched values are exact: the logprobs of the token under each model are then exact.
    assert all(s.base_exact and s.teacher_exact for c in tight for s in c.steps)


async def test_a_tolerance_the_limit_cannot_reach_is_reported() -> None:
    base, teacher = fakes(max_logprobs=20)  # no larger K than the configured one
    base.eos_after = teacher.eos_after = None
    params = GenerationParams(max_tokens=6, seed=1, diagnostics=True, max_uncertain_mass=1e-6)
    async with engine(base, teacher) as coord:
        (out,) = await coord.generate([PROMPT], params)
    assert any(step.certified is False for step in out.steps)
    for step in out.steps:
        assert step.certified == (step.uncertain_mass is not None and step.uncertain_mass <= 1e-6)


async def test_a_tolerance_turns_speculative_rounds_off_and_needs_no_diagnostics() -> None:
    base, teacher = fakes(max_logprobs=1024)
    params = GenerationParams(
        max_tokens=5, seed=2, max_uncertain_mass=0.05, speculative=Speculative(k=3)
    )
    async with engine(base, teacher) as coord:
        (out,) = await coord.generate([PROMPT], params)
    assert all(step.draft == 0 for step in out.steps)
    assert all(step.certified is not None for step in out.steps)
