"""The coordinator end to end against the real CPU vLLM pair (issue 4's e2e checks)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from app.coordinator import (
    ChatMessage,
    Coordinator,
    DualPrompt,
    FinishEvent,
    GenerationParams,
    TokenEvent,
)
from app.sampling.types import MixConfig
from tests.real_vllm import RealVLLM

pytestmark = pytest.mark.real_vllm

QUESTION = [ChatMessage("user", "What is the capital of France?")]


@pytest.fixture
async def coord(real_coordinator: Coordinator) -> Coordinator:
    return real_coordinator


async def test_startup_facts(coord: Coordinator, real_vllm: RealVLLM) -> None:
    assert coord.models["teacher"].name == real_vllm.teacher_model
    assert coord.models["base"].max_model_len >= 512
    # SmolLM2-Instruct's eos_token is <|im_end|>, found through /tokenizer_info.
    assert len(coord.eos_token_ids) == 1
    assert await coord.teacher.detokenize(sorted(coord.eos_token_ids)) == "<|im_end|>"
    assert await coord.ready() is True


async def test_chat_question_gets_a_coherent_answer(coord: Coordinator) -> None:
    prompt = await coord.chat_prompt(QUESTION)
    # The teacher sees its chat template, the base the plain "Question: ...\nAnswer:".
    assert await coord.base.detokenize(prompt.base) == (
        "Question: What is the capital of France?\nAnswer:"
    )
    assert "<|im_start|>assistant\n" in await coord.teacher.detokenize(prompt.teacher)
    params = GenerationParams(max_tokens=60, seed=1, mixing=MixConfig(temperature=0.0))
    [result] = await coord.generate([prompt], params)
    assert result.finish_reason == "stop"
    assert result.stop_reason is None
    assert result.completion_tokens < 60
    assert result.token_ids[-1] in coord.eos_token_ids
    assert "Paris" in result.text
    assert result.text == await coord.teacher.detokenize(result.token_ids[:-1])


async def test_streamed_text_matches_the_ids(coord: Coordinator) -> None:
    prompt = await coord.chat_prompt([ChatMessage("user", "Write one word in French.")])
    events = [e async for e in coord.stream([prompt], GenerationParams(max_tokens=12, seed=3))]
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    finish = events[-1]
    assert isinstance(finish, FinishEvent)
    assert finish.completion_tokens == len(tokens)
    text = "".join(e.text for e in events)
    assert all("\ufffd" not in e.text for e in tokens)
    ids = [e.token_id for e in tokens]
    if finish.finish_reason == "stop":
        ids = ids[:-1]
    assert text == await coord.teacher.detokenize(ids)


async def test_same_seed_same_tokens(coord: Coordinator) -> None:
    prompt = await coord.chat_prompt([ChatMessage("user", "Tell me about cats.")])
    params = GenerationParams(max_tokens=10, n=2, seed=42)
    first = await coord.generate([prompt], params)
    second = await coord.generate([prompt], params)
    assert [r.token_ids for r in first] == [r.token_ids for r in second]
    assert [r.text for r in first] == [r.text for r in second]


async def test_diagnostics_are_consistent(coord: Coordinator) -> None:
    prompt = await coord.chat_prompt([ChatMessage("user", "Name three colours.")])
    results = await coord.generate([prompt], GenerationParams(max_tokens=16, n=2, seed=5))
    steps = [s for r in results for s in r.steps]
    assert len(steps) >= 4
    for result in results:
        assert (result.steps[0].alpha, result.steps[0].reason) == (1.0, "first_token")
        summary = result.summary
        assert summary["tokens"] == len(result.steps) == result.completion_tokens
    for step in steps:
        if step.alpha is None:
            assert step.reason == "single_token"
        else:
            assert 0.0 <= step.alpha <= 1.0
        if step.reason == "solved":
            assert step.kl_gap <= 1e-9
        assert 0.0 <= step.js <= math.log(2) + 1e-9
        assert 0.0 <= step.overlap_mass <= 1.0 + 1e-9
        assert 0 <= step.overlap_count <= 20
        assert step.support_size == len(step.support) >= 1
        assert math.isfinite(step.logprob)
        assert step.logprob <= 1e-9


async def test_first_token_is_the_teachers_distribution(coord: Coordinator) -> None:
    """Forcing on, trust region off: q of step 0 is the teacher's own top-K (renormalized;
    docs/ALGORITHM.md §5.1), so log-ratios of q equal the teacher's log-ratios."""
    prompt = await coord.chat_prompt(QUESTION)
    mixing = MixConfig(trust_region_top_p=None)
    [result] = await coord.generate([prompt], GenerationParams(max_tokens=1, seed=0, mixing=mixing))
    step = result.steps[0]
    assert (step.alpha, step.reason) == (1.0, "first_token")
    teacher = await coord.teacher.topk(prompt.teacher, 20)
    logq = dict(zip(step.support.tolist(), step.logq.tolist(), strict=True))
    ids = list(teacher)
    lps = list(teacher.values())
    assert set(ids) <= set(logq)
    reference = ids[int(np.argmax(lps))]
    for token_id, lp in zip(ids, lps, strict=True):
        expected = lp - max(lps)
        assert logq[token_id] - logq[reference] == pytest.approx(expected, abs=1e-3)
    # Ids only the base proposed share one fill value, no larger than the teacher's smallest.
    fills = {round(v, 9) for y, v in logq.items() if y not in set(ids)}
    assert len(fills) <= 1
    if fills:
        assert fills.pop() <= logq[ids[int(np.argmin(lps))]] + 1e-9


async def test_prompt_pair_from_token_ids(coord: Coordinator) -> None:
    prompts = await coord.completion_prompts(
        "The capital of France is", base_prompt="The capital of France is"
    )
    assert prompts == [DualPrompt(prompts[0].teacher, prompts[0].teacher)]
    params = GenerationParams(max_tokens=3, mixing=MixConfig(temperature=0.0))
    [result] = await coord.generate(prompts, params)
    assert result.completion_tokens == 3
    assert result.text.strip()
