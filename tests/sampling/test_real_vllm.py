"""The math on real top-K responses of the two CPU vLLM servers (ids as `token_id:N` keys)."""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest

from app.sampling import MixConfig, TopK, make_generators, mix_step, top_logprobs, topk_from_mapping
from tests.real_vllm import RealVLLM

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, there"]


def _top_k(client: httpx.Client, url: str, model: str, prompt: str) -> TopK:
    response = client.post(
        f"{url}/v1/completions",
        json={
            "model": model,
            "prompt": prompt,
            "max_tokens": 1,
            "logprobs": 20,
            "return_tokens_as_token_ids": True,
            "temperature": 1.0,
            "seed": 0,
        },
    )
    response.raise_for_status()
    entries = response.json()["choices"][0]["logprobs"]["top_logprobs"][0]
    assert all(key.startswith("token_id:") for key in entries)
    return topk_from_mapping({int(key.split(":", 1)[1]): value for key, value in entries.items()})


@pytest.mark.real_vllm
def test_mixing_real_upstream_distributions(real_vllm: RealVLLM) -> None:
    rng = make_generators(7, 1)[0]
    with httpx.Client(timeout=120.0) as client:
        for prompt in PROMPTS:
            base = _top_k(client, real_vllm.base_url, real_vllm.base_model, prompt)
            teacher = _top_k(client, real_vllm.teacher_url, real_vllm.teacher_model, prompt)
            assert 20 <= base.ids.shape[0] <= 21
            for config in (
                MixConfig(),
                MixConfig(trust_region_top_p=None, stability_check=False),
                MixConfig(temperature=0.0),
                MixConfig(temperature=0.7, top_p=0.9, top_k=5),
            ):
                step = mix_step(base, teacher, config, first_token=False, rng=rng)
                assert step.token_id in step.support.tolist()
                assert math.isfinite(step.logprob)
                assert step.logprob <= 0.0
                assert math.isfinite(step.js)
                assert math.isfinite(step.chernoff)
                assert 0.0 <= step.filled_mass <= 1.0
                assert not np.isnan(step.logq).any()
                if step.reason == "solved":
                    assert step.kl_gap <= 1e-9
                tops = list(top_logprobs(step, 5).values())
                assert tops == sorted(tops, reverse=True)
                assert tops[0] >= step.logprob
