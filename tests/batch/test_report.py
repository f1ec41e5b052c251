"""`dual-vllm report`: the numbers, the plots and the HTML from an output file."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest

from app.batch.report import PLOTS, analyse, colour_tokens, write_report
from app.batch.runner import run_job
from app.batch.writer import final_records
from app.cli import main as cli_main
from app.errors import ContextLengthError
from tests.batch.scripted import ScriptedCoordinator, fake_steps, parse_job

PNG = b"\x89PNG\r\n\x1a\n"


async def _output(dataset: Path, tmp_path: Path, *extra: str) -> Path:
    out = tmp_path / "out.jsonl"
    job, settings, _ = parse_job(
        str(dataset), "-o", str(out), "--prompt-field", "problem", "-n", "2", "--quiet",
        "--retries", "0", *extra,
    )  # fmt: skip
    failures: dict[str, Any] = {"number 4": (-1, lambda: ContextLengthError("too long"))}
    coord = ScriptedCoordinator(settings, failures=failures)
    await run_job(job, settings, coordinator_factory=lambda _s: coord, stdout=io.StringIO())
    return out


async def test_report_numbers_plots_and_html(dataset: Path, tmp_path: Path) -> None:
    out = await _output(dataset, tmp_path, "--diagnostics")
    report_dir = tmp_path / "rep"
    analysis = write_report(out, report_dir, samples=3)

    records = final_records(out)
    ok = [r for r in records if r["status"] == "ok"]
    steps = [s for r in ok for s in fake_steps(r["seed"])]
    assert (analysis.ok, analysis.failed) == (8, 2)
    assert analysis.errors == {"ContextLengthError": 2}
    assert analysis.tokens == len(steps)
    alphas = [s.alpha for s in steps if s.alpha is not None]
    assert analysis.alpha_mean == pytest.approx(sum(alphas) / len(alphas))
    unstable = sum(s.reason == "unstable" for s in steps)
    assert analysis.fallback_rate == pytest.approx(unstable / len(steps))
    # fallback by position: position 0 is always first_token, never a fallback
    by_position = analysis.fallback_by_position()
    assert by_position[0] == 0.0
    at1 = [fake_steps(r["seed"])[1].reason for r in ok]
    assert by_position[1] == pytest.approx(at1.count("unstable") / len(at1))

    for name in PLOTS:
        assert (report_dir / name).read_bytes().startswith(PNG)
    summary = json.loads((report_dir / "summary.json").read_text())
    assert summary["ok"] == 8
    assert summary["failed"] == 2
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == len(PLOTS)
    assert all(base64.b64decode(data).startswith(PNG) for data in images)
    # token colouring: 3 samples shown, one span per token, α in the hover text
    assert page.count("<section>") == 3
    first = ok[0]
    spans = colour_tokens(first)
    assert spans.count("<span") == len(first["completion_token_ids"])
    assert f"α {first['diagnostics']['alpha'][0]:.3f}" in spans


async def test_report_without_diagnostics_uses_summaries(dataset: Path, tmp_path: Path) -> None:
    out = await _output(dataset, tmp_path)
    analysis = analyse(final_records(out))
    assert analysis.with_diagnostics == 0
    assert analysis.alphas == []
    assert len(analysis.sample_alpha_means) == 8
    assert analysis.reasons_at == []
    assert analysis.fallback_rate is not None  # from the per-sample reason counts
    html_spans = colour_tokens(final_records(out)[0])
    assert html_spans.startswith("<pre>")


def test_report_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.jsonl"
    record = {
        "id": "0", "sample_index": 0, "status": "ok", "completion": "<b>hi</b>",
        "completion_token_ids": [1, 2], "finish_reason": "stop",
        "summary": {"tokens": 2, "alpha_mean": 0.5, "reasons": {"solved": 2}},
        "diagnostics": {"token_ids": [1, 2], "token_text": ["<b>h", "i</b>"],
                        "alpha": [0.25, None], "reason": ["solved", "single_token"],
                        "js": [0.1, 0.0]},
    }  # fmt: skip
    out.write_text(json.dumps(record) + "\n" + '{"id": "1", "sam')  # + a torn line
    assert cli_main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "samples: 1 (1 ok, 0 failed)" in text
    assert "alpha mean: 0.2500 (tokens)" in text
    page = (tmp_path / "o.jsonl.report" / "report.html").read_text()
    assert "&lt;b&gt;h" in page  # completion text is escaped
    assert "<b>h" not in page
    assert cli_main(["report", str(tmp_path / "missing.jsonl")]) == 2
