"""Smoke tests against the two real CPU vLLM servers, and the converter's accuracy.

The accuracy reference is independent of our conversion: `app/localvllm/reference.py` runs a
float64 numpy forward pass straight over the GGUF's tensors in llama.cpp's own layout
(interleaved-pair RoPE on the permuted q/k rows), in the vLLM venv which has `gguf`.
"""

from __future__ import annotations

import json
import math
import subprocess
from typing import Any

import httpx
import pytest

import app.localvllm.reference as gguf_reference
from app.localvllm.setup import BASE_LAYERS, TEACHER_LAYERS, Layout
from tests.real_vllm import RealVLLM

pytestmark = pytest.mark.real_vllm

PROMPT = "The capital of France is"
# Our float32 server vs the float64 reference over the same dequantized weights: measured
# differences are ~1e-5; 2e-3 leaves room for CPU kernels without hiding a wrong tensor (a
# wrong permutation or layer moves these logprobs by whole units).
TOLERANCE = 2e-3


def tokenize(url: str, model: str, prompt: str) -> list[int]:
    response = httpx.post(f"{url}/tokenize", json={"model": model, "prompt": prompt}, timeout=30)
    assert response.status_code == 200, response.text
    tokens: list[int] = response.json()["tokens"]
    return tokens


def top_logprobs(url: str, model: str, ids: list[int], k: int) -> dict[int, float]:
    body = {
        "model": model,
        "prompt": ids,
        "max_tokens": 1,
        "temperature": 0,
        "logprobs": k,
        "return_tokens_as_token_ids": True,
    }
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    top = response.json()["choices"][0]["logprobs"]["top_logprobs"][0]
    assert all(key.startswith("token_id:") for key in top)
    return {int(key.removeprefix("token_id:")): float(value) for key, value in top.items()}


@pytest.fixture(scope="module")
def prompt_ids(real_vllm: RealVLLM) -> list[int]:
    return tokenize(real_vllm.teacher_url, real_vllm.teacher_model, PROMPT)


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    """Top-5 from the GGUF for both layer counts (one subprocess, ~10 s)."""
    layout = Layout.from_env()
    ids = "504,3575,282,4649,314"  # PROMPT; the tokenizer test checks this against the server
    result = subprocess.run(
        [
            str(layout.python),
            gguf_reference.__file__,
            "--gguf",
            str(layout.gguf()),
            "--ids",
            ids,
            "--top",
            "5",
            "--layers",
            f"{TEACHER_LAYERS},{BASE_LAYERS}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_both_servers_serve_their_model(real_vllm: RealVLLM) -> None:
    for url, model, layers in (
        (real_vllm.base_url, real_vllm.base_model, BASE_LAYERS),
        (real_vllm.teacher_url, real_vllm.teacher_model, TEACHER_LAYERS),
    ):
        models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
        assert [m["id"] for m in models] == [model]
        assert models[0]["max_model_len"] == 2048
        info = httpx.get(f"{url}/tokenizer_info", timeout=10)
        assert info.status_code == 200  # --enable-tokenizer-info-endpoint
        assert layers in (BASE_LAYERS, TEACHER_LAYERS)


def test_same_token_ids_to_both_give_top_k_keyed_by_token_id(
    real_vllm: RealVLLM, prompt_ids: list[int]
) -> None:
    for url, model in (
        (real_vllm.base_url, real_vllm.base_model),
        (real_vllm.teacher_url, real_vllm.teacher_model),
    ):
        top = top_logprobs(url, model, prompt_ids, 20)
        assert len(top) == 20  # temperature 0: the sampled token is in the top 20
        assert all(0 <= token < 49152 for token in top)
        assert all(-9999.0 <= lp <= 0.0 for lp in top.values())
        assert 0.5 < sum(math.exp(lp) for lp in top.values()) <= 1.0 + 1e-4
        assert list(top.values()) == sorted(top.values(), reverse=True)


def test_logprobs_up_to_64_are_allowed(real_vllm: RealVLLM, prompt_ids: list[int]) -> None:
    assert len(top_logprobs(real_vllm.teacher_url, real_vllm.teacher_model, prompt_ids, 64)) == 64


def test_tokenizers_agree(real_vllm: RealVLLM) -> None:
    for text in (PROMPT, "Question: What is 2+2?\nAnswer:", "naïve café — 東京 🚀"):
        assert tokenize(real_vllm.base_url, real_vllm.base_model, text) == tokenize(
            real_vllm.teacher_url, real_vllm.teacher_model, text
        )
    chat = {"messages": [{"role": "user", "content": "Hi"}], "add_generation_prompt": True}
    rendered = [
        httpx.post(f"{url}/tokenize", json={"model": model, **chat}, timeout=30).json()["tokens"]
        for url, model in (
            (real_vllm.base_url, real_vllm.base_model),
            (real_vllm.teacher_url, real_vllm.teacher_model),
        )
    ]
    assert rendered[0] == rendered[1]
    assert rendered[1][0] == 1  # <|im_start|>: the GGUF's chat template was carried over
    assert rendered[1].count(1) == 3  # system, user, assistant turns


def test_base_and_teacher_distributions_differ(real_vllm: RealVLLM, prompt_ids: list[int]) -> None:
    base = top_logprobs(real_vllm.base_url, real_vllm.base_model, prompt_ids, 20)
    teacher = top_logprobs(real_vllm.teacher_url, real_vllm.teacher_model, prompt_ids, 20)
    assert next(iter(teacher)) == 7042  # " Paris"
    assert next(iter(base)) == 260  # " the": 28 layers are a different model
    shared = set(base) & set(teacher)
    total_variation = 0.5 * sum(
        abs(math.exp(base.get(t, -math.inf)) - math.exp(teacher.get(t, -math.inf)))
        for t in set(base) | set(teacher)
    )
    assert total_variation > 0.2
    assert len(shared) >= 5  # yet the same tokenizer and a related distribution


def test_prompt_tokenization_matches_the_gguf_vocabulary(
    prompt_ids: list[int], reference: dict[str, Any]
) -> None:
    assert prompt_ids == [504, 3575, 282, 4649, 314]
    # GGUF token strings use byte-level BPE's "Ġ" for a leading space.
    assert "".join(reference["prompt_tokens"]).replace("\u0120", " ") == PROMPT


@pytest.mark.parametrize("layers", [TEACHER_LAYERS, BASE_LAYERS])
def test_converted_model_matches_the_gguf_top5(
    real_vllm: RealVLLM, prompt_ids: list[int], reference: dict[str, Any], layers: int
) -> None:
    url, model = (
        (real_vllm.teacher_url, real_vllm.teacher_model)
        if layers == TEACHER_LAYERS
        else (real_vllm.base_url, real_vllm.base_model)
    )
    served = top_logprobs(url, model, prompt_ids, 5)
    expected = reference["top"][str(layers)]
    assert list(served) == [token for token, _, _ in expected]
    for token, logprob, text in expected:
        assert abs(served[token] - logprob) <= TOLERANCE, (token, text, served[token], logprob)
        detok = httpx.post(
            f"{url}/detokenize", json={"model": model, "tokens": [token]}, timeout=30
        ).json()["prompt"]
        assert detok == text.replace("\u0120", " ")
    if layers == TEACHER_LAYERS:
        # docs/LOCAL_VLLM.md, measured with llama.cpp on the GGUF: " Paris" -0.26, " the" -2.75.
        assert abs(served[7042] - (-0.26)) < 0.02
        assert abs(served[260] - (-2.75)) < 0.02
