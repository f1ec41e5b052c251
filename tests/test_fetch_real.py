"""Fetching more for one step against the real CPU vLLM pair: `token_logprobs` (vLLM's
`logprob_token_ids`) gives the same values as the server's own top K, an id outside the top K
gets a smaller value, and --max-logprobs is read from the server."""

from __future__ import annotations

import asyncio

import pytest

from app.settings import Settings
from app.upstream import UpstreamClient
from tests.real_vllm import RealVLLM

pytestmark = pytest.mark.real_vllm

K = 20
# The same forward pass's log-softmax read two ways; CPU kernels may differ slightly between
# batches of different shapes.
TOLERANCE = 1e-4


async def test_token_logprobs_match_the_top_k(real_vllm: RealVLLM) -> None:
    settings = Settings(base_url=[real_vllm.base_url], teacher_url=[real_vllm.teacher_url])
    for url, model in (
        (real_vllm.teacher_url, real_vllm.teacher_model),
        (real_vllm.base_url, real_vllm.base_model),
    ):
        async with UpstreamClient("teacher", [url], settings, model=model) as client:
            info = await client.discover()
            limit = await client.discover_max_logprobs()
            assert limit is not None
            assert limit >= 64  # the local servers' --max-logprobs (1024 since this change)
            assert client.info is not None
            assert client.info.max_logprobs == limit
            assert info.name == model

            prompt = await client.tokenize("The capital of France is", add_special_tokens=False)
            top = await client.topk(prompt, K)
            ranked = sorted(top, key=top.__getitem__, reverse=True)
            kth = top[ranked[K - 1]]
            outside = next(i for i in range(1000, 2000) if i not in top)
            chosen = [ranked[0], ranked[3], ranked[K - 1], outside]
            exact = await client.token_logprobs(prompt, chosen)
            assert list(exact) == chosen
            for token_id in chosen[:3]:
                assert exact[token_id] == pytest.approx(top[token_id], abs=TOLERANCE)
            assert exact[outside] < kth

            # Ids and top-K probes at once: the client keeps them apart (vLLM 0.32's batch
            # bug would otherwise spoil the top K), so every answer is whole.
            results = await asyncio.gather(
                *(client.topk([*prompt, step], K) for step in range(3)),
                client.token_logprobs(prompt, list(range(300))),
            )
            assert all(len(result) >= K for result in results[:3])
            assert len(results[3]) == 300
