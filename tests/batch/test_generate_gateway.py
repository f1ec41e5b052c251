"""`generate --gateway URL`: the same job through a deployed gateway (a real uvicorn serving
the gateway app, API key required, in front of the fake vLLM pair on real ports) gives the
records the in-process job gives, token for token, minus what HTTP does not carry."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.batch.cli import settings_from_args
from app.batch.gateway import GatewayBackend
from app.batch.runner import run_job
from app.batch.writer import iter_records
from app.cli import main as cli_main
from app.main import create_app
from app.settings import Settings
from tests.batch.scripted import parse_job, write_jsonl
from tests.fakes import fake_pair, serve, serve_pair

KEY = "sekrit-key"


@pytest.fixture
def deployed() -> Iterator[tuple[str, str, str]]:
    """(base_url, teacher_url, gateway_url): the fakes, and a gateway in front of them."""
    with serve_pair(*fake_pair(eos_after=7)) as (base_url, teacher_url, _, _):
        settings = Settings(base_url=[base_url], teacher_url=[teacher_url], api_keys=[KEY])
        with serve(create_app(settings), lifespan="on") as gateway_url:
            yield base_url, teacher_url, gateway_url


def _dataset(tmp_path: Path) -> Path:
    rows = [{"id": f"p{i}", "q": f"Question number {i}?"} for i in range(4)]
    return write_jsonl(tmp_path / "questions.jsonl", rows)


# What HTTP does not carry (docs/BATCH.md, generate --gateway).
_NOT_OVER_HTTP = {"prompt_token_ids", "models", "elapsed_seconds", "usage", "diagnostics"}


@pytest.mark.parametrize("template", [None, "Q: {prompt}"])
async def test_gateway_records_equal_in_process_records(
    deployed: tuple[str, str, str], tmp_path: Path, template: str | None
) -> None:
    base_url, teacher_url, gateway_url = deployed
    argv = [str(_dataset(tmp_path)), "--prompt-field", "q", "--id-field", "id", "-n", "2"]
    argv += ["--max-tokens", "10", "--seed", "3", "--diagnostics", "--quiet"]
    argv += ["--preset", "conservative", "--temperature", "0.8", "--stop", "zz"]
    if template is not None:
        argv += ["--teacher-template", template]

    direct_out, gateway_out = tmp_path / "direct.jsonl", tmp_path / "gateway.jsonl"
    job, _, args = parse_job(*argv, "-o", str(direct_out))
    args.base_url, args.teacher_url = base_url, teacher_url
    await run_job(job, settings_from_args(args), stdout=io.StringIO())

    job, _, args = parse_job(*argv, "-o", str(gateway_out), "--gateway", gateway_url)
    totals = await run_job(
        job,
        settings_from_args(args),
        coordinator_factory=lambda _s: GatewayBackend(gateway_url, KEY),
        stdout=io.StringIO(),
    )
    assert (totals.ok, totals.failed) == (8, 0)

    direct, through = list(iter_records(direct_out)), list(iter_records(gateway_out))
    assert [list(r) for r in through] == [list(r) for r in direct]  # same fields, same order
    for want, got in zip(direct, through, strict=True):
        same = {k: v for k, v in want.items() if k not in _NOT_OVER_HTTP}
        assert {k: got[k] for k in same} == same  # tokens, text, summary, seeds, config
        assert got["models"] == {"gateway": "dual-vllm"}
        assert got["prompt_token_ids"] is None
        usage: dict[str, Any] = got["usage"]
        assert usage == {**want["usage"], "base_prompt_tokens": None}
        columns = dict(got["diagnostics"])
        assert columns.pop("support_size") == [None] * len(got["completion_token_ids"])
        expected = {k: v for k, v in want["diagnostics"].items() if k != "support_size"}
        expected.pop("token_text")
        assert columns == expected


def test_gateway_api_key_from_the_environment_and_a_wrong_key(
    deployed: tuple[str, str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, _, gateway_url = deployed
    for name in ("DUAL_VLLM_BASE_URL", "DUAL_VLLM_TEACHER_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    argv = ["generate", str(_dataset(tmp_path)), "--prompt-field", "q", "--max-tokens", "5"]
    argv += ["--gateway", gateway_url, "--quiet", "-o"]
    monkeypatch.setenv("DUAL_VLLM_API_KEY", "wrong")
    assert cli_main([*argv, str(tmp_path / "a.jsonl")]) == 2
    assert "401" in capsys.readouterr().err
    monkeypatch.setenv("DUAL_VLLM_API_KEY", KEY)
    assert cli_main([*argv, str(tmp_path / "b.jsonl")]) == 0
    assert "4 generated, 0 failed" in capsys.readouterr().out
    monkeypatch.delenv("DUAL_VLLM_API_KEY")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    assert cli_main([*argv, str(tmp_path / "c.jsonl"), "--api-key", "wrong"]) == 2
    assert cli_main([*argv, str(tmp_path / "c.jsonl")]) == 0
