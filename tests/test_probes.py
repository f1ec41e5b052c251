"""app/probes.py: probes of concurrent sequences travel together, errors stay with the prompt
that caused them, and callers that all go away cancel the request."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.coordinator import Coordinator, DualPrompt, GenerationParams
from app.errors import UpstreamError, UpstreamRejectedError
from app.probes import ProbeBatcher, parse_batch
from app.settings import Settings
from tests.fakes import FakeVLLM, encode
from tests.fakes.vllm import BASE_URL, TEACHER_URL, pair_transport


class Upstream:
    """send_one / send_batch stand-ins that record what was sent."""

    def __init__(self, *, reject: set[int] | None = None, fail: bool = False) -> None:
        self.batches: list[list[list[int]]] = []
        self.reject = reject or set()  # prompts whose first id is here get a 400
        self.fail = fail
        self.release = asyncio.Event()
        self.release.set()
        self.cancelled = 0

    async def _answer(self, prompts: list[list[int]], k: int) -> list[dict[int, float]]:
        self.batches.append(prompts)
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail:
            raise UpstreamError("teacher upstream error (500): boom", upstream="teacher")
        if any(p[0] in self.reject for p in prompts):
            raise UpstreamRejectedError("bad prompt", upstream="teacher")
        return [{p[-1]: -0.5, k: -1.0} for p in prompts]

    async def one(self, prompt: list[int], k: int) -> dict[int, float]:
        (result,) = await self._answer([prompt], k)
        return result

    def batcher(self) -> ProbeBatcher:
        return ProbeBatcher(self.one, self._answer, max_batch=3)


async def test_probes_of_one_loop_turn_travel_together_in_chunks_of_max_batch() -> None:
    upstream = Upstream()
    batcher = upstream.batcher()
    results = await asyncio.gather(*(batcher.submit([i, 10 + i], 5) for i in range(7)))
    assert results == [{10 + i: -0.5, 5: -1.0} for i in range(7)]
    assert [len(b) for b in upstream.batches] == [3, 3, 1]


async def test_different_k_travel_apart_and_a_lone_probe_goes_alone() -> None:
    upstream = Upstream()
    batcher = upstream.batcher()
    await asyncio.gather(batcher.submit([1], 5), batcher.submit([2], 6))
    assert sorted(upstream.batches) == [[[1]], [[2]]]


async def test_a_rejected_prompt_fails_only_its_own_probe() -> None:
    upstream = Upstream(reject={2})
    batcher = upstream.batcher()
    outcomes = await asyncio.gather(
        *(batcher.submit([i], 5) for i in range(3)), return_exceptions=True
    )
    assert outcomes[0] == {0: -0.5, 5: -1.0}
    assert isinstance(outcomes[2], UpstreamRejectedError)
    assert outcomes[1] == {1: -0.5, 5: -1.0}
    assert upstream.batches[0] == [[0], [1], [2]]  # tried together first, then one by one
    assert sorted(upstream.batches[1:]) == [[[0]], [[1]], [[2]]]


async def test_an_upstream_failure_fails_every_probe_of_the_batch_with_its_status() -> None:
    upstream = Upstream(fail=True)
    batcher = upstream.batcher()
    outcomes = await asyncio.gather(
        *(batcher.submit([i], 5) for i in range(3)), return_exceptions=True
    )
    assert all(isinstance(o, UpstreamError) and o.status == 502 for o in outcomes)
    assert len(upstream.batches) == 1


async def test_the_request_is_cancelled_only_when_every_caller_has_gone() -> None:
    upstream = Upstream()
    upstream.release.clear()
    batcher = upstream.batcher()
    callers = [asyncio.create_task(batcher.submit([i], 5)) for i in range(2)]
    while not upstream.batches:  # noqa: ASYNC110 - a plain list of the stand-in
        await asyncio.sleep(0)
    callers[0].cancel()
    await asyncio.sleep(0.01)
    assert upstream.cancelled == 0  # the other caller still waits for the answer
    upstream.release.set()
    assert await callers[1] == {1: -0.5, 5: -1.0}

    upstream.release.clear()
    callers = [asyncio.create_task(batcher.submit([i], 5)) for i in range(2)]
    while len(upstream.batches) < 2:  # noqa: ASYNC110 - a plain list of the stand-in
        await asyncio.sleep(0)
    for caller in callers:
        caller.cancel()
    await asyncio.sleep(0.01)
    assert upstream.cancelled == 1


def test_parse_batch_reads_choices_by_index_and_refuses_a_missing_one() -> None:
    def choice(index: int, token: int) -> dict[str, Any]:
        return {"index": index, "logprobs": {"top_logprobs": [{f"token_id:{token}": -0.1}]}}

    body = {"choices": [choice(1, 7), choice(0, 3)]}
    assert parse_batch(body, 2, upstream="base") == [{3: -0.1}, {7: -0.1}]
    with pytest.raises(UpstreamError, match="without a choice for each"):
        parse_batch({"choices": [choice(0, 3)]}, 2, upstream="base")


# --- through the coordinator ----------------------------------------------------------------

PROMPT = DualPrompt(teacher=encode("Say something"), base=encode("Question: Say something"))


async def _generate(batch: bool) -> tuple[list[list[int]], int, int]:
    base, teacher = FakeVLLM("base"), FakeVLLM("teacher")
    base.eos_after = teacher.eos_after = None
    settings = Settings(base_url=[BASE_URL], teacher_url=[TEACHER_URL], upstream_batch_probes=batch)
    async with Coordinator(settings, transport=pair_transport(base=base, teacher=teacher)) as c:
        started = teacher.completions_started
        results = await c.generate([PROMPT], GenerationParams(max_tokens=12, n=16, seed=11))
        return (
            [r.token_ids for r in results],
            teacher.completions_started - started,
            teacher.prompts_served,
        )


async def test_coalescing_keeps_seeded_output_and_cuts_requests_per_token() -> None:
    batched, batched_requests, _ = await _generate(True)
    alone, alone_requests, _ = await _generate(False)
    assert batched == alone  # the same tokens: a batch changes nothing but the request count
    assert alone_requests == 16 * 12
    assert batched_requests <= 2 * 12  # 16 sequences in step: about one request per token
