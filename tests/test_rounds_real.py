"""Speculative rounds and certified support against the real CPU vLLM pair (docs/ALGORITHM.md §8,
§9): vLLM's streamed drafts, its seeded top-k sampling and `logprob_token_ids` as the engine
uses them."""

from __future__ import annotations

import pytest

from app.coordinator import ChatMessage, Coordinator, GenerationParams
from app.generation import Speculative

pytestmark = pytest.mark.real_vllm

STORY = [ChatMessage("user", "Tell me a short story about a lighthouse keeper.")]


@pytest.fixture
async def coord(real_coordinator: Coordinator) -> Coordinator:
    return real_coordinator


@pytest.mark.parametrize("drafter", ["base", "teacher"])
async def test_rounds_draft_judge_and_reproduce(coord: Coordinator, drafter: str) -> None:
    prompt = await coord.chat_prompt(STORY)
    params = GenerationParams(
        max_tokens=24,
        seed=7,
        ignore_eos=True,
        diagnostics=True,
        speculative=Speculative(k=6, drafter=drafter),  # type: ignore[arg-type]
    )
    (first,) = await coord.generate([prompt], params)
    (again,) = await coord.generate([prompt], params)
    assert len(first.token_ids) == 24
    assert first.finish_reason == "length"
    drafts = [step.draft for step in first.steps]
    assert drafts.count(1) > 0  # some drafted tokens were kept
    assert all(code != 0 for code in drafts[:-1])  # rounds throughout (the last may be plain)
    summary = first.summary
    assert summary["acceptance_rate"] is not None
    assert 0 < summary["acceptance_rate"] <= 1
    assert summary["tokens_per_round"] is not None
    assert summary["tokens_per_round"] > 1
    # The drafter's seed comes from the request's generator: the same request, the same tokens
    # (as long as vLLM answers the same logprobs, which it does for the same requests here).
    assert again.token_ids == first.token_ids
    assert first.text == await coord.pair.detokenize(first.token_ids)


async def test_a_tolerance_is_met_with_logprob_token_ids_and_a_larger_k(coord: Coordinator) -> None:
    prompt = await coord.chat_prompt(STORY)
    params = GenerationParams(
        max_tokens=6, seed=3, ignore_eos=True, diagnostics=True, max_uncertain_mass=0.05
    )
    (out,) = await coord.generate([prompt], params)
    assert len(out.token_ids) == 6
    for step in out.steps:
        assert step.uncertain_mass is not None
        assert step.certified == (step.uncertain_mass <= 0.05)
    assert any(step.refetches > 0 for step in out.steps)
    limit = min(coord.models[m].max_logprobs or 0 for m in ("base", "teacher"))
    if limit >= 1024:  # dual-vllm local's servers: room to certify every token
        assert all(step.certified for step in out.steps)
