"""The coordinator's text with the teacher's tokenizer in process (DUAL_VLLM_TOKENIZER) is the
text of the teacher's /detokenize, with no /detokenize request per token."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.coordinator import Coordinator, DualPrompt, GenerationParams, StartupError
from app.settings import Settings
from tests.fakes import FakeVLLM, encode
from tests.fakes.tokenizer import write_fake_tokenizer
from tests.fakes.vllm import BASE_URL, TEACHER_URL, pair_transport

PROMPT = DualPrompt(teacher=encode("Say something"), base=encode("Question: Say something"))


def settings(**overrides: Any) -> Settings:
    return Settings(base_url=[BASE_URL], teacher_url=[TEACHER_URL], **overrides)


async def run(tokenizer: Path | None, params: GenerationParams) -> tuple[list[Any], int]:
    base, teacher = FakeVLLM("base"), FakeVLLM("teacher")
    base.eos_after = teacher.eos_after = None
    extra = {} if tokenizer is None else {"tokenizer": str(tokenizer)}
    coord = Coordinator(settings(**extra), transport=pair_transport(base=base, teacher=teacher))
    async with coord:
        before = teacher.calls["/detokenize"]
        events = [
            (type(e).__name__, e.index, e.text, getattr(e, "token_id", None))
            async for e in coord.stream([PROMPT], params)
        ]
        return events, teacher.calls["/detokenize"] - before


async def test_in_process_text_equals_the_teachers_detokenize(tmp_path: Path) -> None:
    tokenizer = write_fake_tokenizer(tmp_path / "tok")
    # 150 tokens: the text window slides several times; stop strings exercise the scan.
    params = GenerationParams(max_tokens=150, n=3, seed=7, stop=["qqq"], ignore_eos=True)
    remote, remote_calls = await run(None, params)
    local, local_calls = await run(tokenizer, params)
    assert local == remote
    assert remote_calls >= 150 * 3  # one per token of each choice (plus the window slides)
    assert local_calls == 0


async def test_a_tokenizer_that_is_not_the_teachers_refuses_to_start(tmp_path: Path) -> None:
    tokenizer = write_fake_tokenizer(tmp_path / "tok")
    # Another model's tokenizer: two letters of the start-up probe text swap ids.
    spec = json.loads((tokenizer / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    vocab["H"], vocab["e"] = vocab["e"], vocab["H"]
    (tokenizer / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    base, teacher = FakeVLLM("base"), FakeVLLM("teacher")
    coord = Coordinator(
        settings(tokenizer=str(tokenizer)), transport=pair_transport(base=base, teacher=teacher)
    )
    with pytest.raises(StartupError, match="DUAL_VLLM_TOKENIZER"):
        await coord.start()


async def test_a_missing_tokenizer_is_a_startup_error(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="cannot load the teacher's tokenizer"):
        Coordinator(settings(tokenizer=str(tmp_path / "nothing")))
