"""The official openai client against the gateway on a real uvicorn over the REAL CPU vLLM pair
(tests/real_vllm.py): completions and chat, streaming and not, a seed reproduces, diagnostics.

The pair runs ~4 tokens/s per sequence, so requests stay short."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from app.main import create_app
from app.metrics import Metrics
from app.settings import Settings
from tests.fakes.vllm import serve
from tests.real_vllm import RealVLLM

pytestmark = pytest.mark.real_vllm

MESSAGES: Any = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(real_vllm: RealVLLM) -> Iterator[openai.OpenAI]:
    settings = Settings(
        base_url=[real_vllm.base_url],
        teacher_url=[real_vllm.teacher_url],
        base_model=real_vllm.base_model,
        teacher_model=real_vllm.teacher_model,
    )
    with serve(create_app(settings, metrics=Metrics()), lifespan="on", timeout=20) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
        yield client
        client.close()


def test_completion_with_base_prompt_seed_and_diagnostics(client: openai.OpenAI) -> None:
    request: dict[str, Any] = {
        "model": "dual-vllm",
        "prompt": "The capital of France is",
        "max_tokens": 6,
        "seed": 1234,
        "logprobs": 2,
        "extra_body": {
            "base_prompt": "The capital of France is",
            "mixing": {"diagnostics": True},
            "return_token_ids": True,
        },
    }
    first = client.completions.create(**request)
    second = client.completions.create(**request)
    choice = first.choices[0]
    extra = choice.model_extra or {}
    assert choice.text == second.choices[0].text  # same seed, same upstreams: same tokens
    assert extra["token_ids"] == (second.choices[0].model_extra or {})["token_ids"]
    assert first.usage is not None
    diagnostics = extra["diagnostics"]
    assert diagnostics["summary"]["tokens"] == first.usage.completion_tokens == 6
    assert diagnostics["reason"][0] == "first_token"
    assert diagnostics["alpha"][0] == 1.0
    for alpha, reason, gap in zip(
        diagnostics["alpha"], diagnostics["reason"], diagnostics["kl_gap"], strict=True
    ):
        assert alpha is None or 0.0 <= alpha <= 1.0
        if reason == "solved":
            assert abs(gap) <= 1e-9
    assert choice.logprobs is not None
    assert choice.logprobs.token_logprobs is not None
    assert all(v <= 0 for v in choice.logprobs.token_logprobs if v is not None)


def test_streamed_completion_equals_the_non_streamed_one(client: openai.OpenAI) -> None:
    request: dict[str, Any] = {"model": "dual-vllm", "prompt": "1, 2, 3,", "max_tokens": 5}
    full = client.completions.create(seed=7, **request).choices[0].text
    chunks = list(client.completions.create(seed=7, stream=True, **request))
    assert "".join(c.choices[0].text for c in chunks) == full
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_streaming_and_not(client: openai.OpenAI) -> None:
    # Greedy (temperature 0 = argmax of q): these two small models then answer coherently;
    # sampled at temperature 1 their mixture often drifts into other languages.
    chat = client.chat.completions.create(
        model="dual-vllm",
        messages=MESSAGES,
        max_tokens=16,
        temperature=0,
        extra_body={"mixing": {"diagnostics": True}},
    )
    content = chat.choices[0].message.content
    assert content
    assert "Paris" in content
    assert chat.choices[0].finish_reason == "stop"  # the teacher's EOS, before max_tokens
    assert (chat.choices[0].model_extra or {})["diagnostics"]["summary"]["tokens"] >= 1
    stream = client.chat.completions.create(
        model="dual-vllm", messages=MESSAGES, max_tokens=16, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == content
