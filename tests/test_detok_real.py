"""The teacher's tokenizer in process (DUAL_VLLM_TOKENIZER) against the real CPU vLLM teacher:
the same text as its /detokenize, for chosen and random ids and for whole generations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np
import pytest

from app.coordinator import ChatMessage, Coordinator, GenerationParams
from app.detok import LocalDecoder
from app.settings import Settings
from tests.real_vllm import RealVLLM

pytestmark = pytest.mark.real_vllm

TEXTS = [
    "Hello, world! Héllo wörld — 123 ✓ 日本語\n  tab\tend.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces, émojis 🙂🙂 and    runs of spaces  ",
]


def detokenize(client: httpx.Client, url: str, ids: Sequence[int]) -> str:
    response = client.post(f"{url}/detokenize", json={"tokens": list(ids)})
    response.raise_for_status()
    text: str = response.json()["prompt"]
    return text


def test_local_decoding_equals_the_teachers_detokenize(real_vllm: RealVLLM) -> None:
    local = LocalDecoder(real_vllm.tokenizer)
    rng = np.random.default_rng(0)
    with httpx.Client(timeout=60) as client:
        cases: list[list[int]] = []
        for text in TEXTS:
            response = client.post(f"{real_vllm.teacher_url}/tokenize", json={"prompt": text})
            ids = response.json()["tokens"]
            cases += [ids[:end] for end in range(1, len(ids) + 1)]  # every prefix
        cases += [[int(i) for i in rng.integers(0, 49152, size=n)] for n in (1, 2, 5, 40, 200)]
        for ids in cases:
            assert local.decode_now(ids) == detokenize(client, real_vllm.teacher_url, ids), ids


async def _run(real_vllm: RealVLLM, **extra: Any) -> list[tuple[str, int, str]]:
    settings = Settings(base_url=[real_vllm.base_url], teacher_url=[real_vllm.teacher_url], **extra)
    async with Coordinator(settings) as coord:
        prompt = await coord.chat_prompt([ChatMessage("user", "Write a haiku about the sea.")])
        params = GenerationParams(max_tokens=80, n=2, seed=3, ignore_eos=True, stop=["\n\n\n"])
        return [(type(e).__name__, e.index, e.text) async for e in coord.stream([prompt], params)]


async def test_streamed_text_is_the_same_with_the_tokenizer_in_process(
    real_vllm: RealVLLM,
) -> None:
    remote = await _run(real_vllm)
    local = await _run(real_vllm, tokenizer=real_vllm.tokenizer)
    for index in (0, 1):  # per choice: the two choices' events interleave by timing
        in_process = [(kind, text) for kind, i, text in local if i == index]
        assert in_process == [(kind, text) for kind, i, text in remote if i == index]
        assert "".join(text for _, text in in_process)  # some text came out
