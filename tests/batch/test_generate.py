"""The batch job's logic with a scripted coordinator: records, prompts as sent, resume,
failures and retries, config changes, shards, diagnostics. (Real HTTP and kill -9:
test_generate_fake.py; the real vLLM pair: test_generate_real.py.)"""

from __future__ import annotations

import io
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from app.batch.datasets import sample_seed
from app.batch.job import Job, Templates, build_prompt
from app.batch.runner import run_job
from app.batch.writer import StoreError, iter_records
from app.cli import main as cli_main
from app.errors import ContextLengthError, UpstreamUnavailableError
from app.settings import Settings
from tests.batch.scripted import ScriptedCoordinator, fake_steps, parse_job, token_text


async def _run(
    job: Job, settings: Settings, coordinator: ScriptedCoordinator | None = None
) -> tuple[Any, ScriptedCoordinator, str]:
    coord = coordinator or ScriptedCoordinator(settings)
    out = io.StringIO()
    totals = await run_job(job, settings, coordinator_factory=lambda _s: coord, stdout=out)
    return totals, coord, out.getvalue()


def _keys(path: Path) -> list[tuple[str, int]]:
    return [(r["id"], r["sample_index"]) for r in iter_records(path)]


async def test_records_have_the_documented_fields(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    job, settings, _ = parse_job(
        str(dataset), "-o", str(out), "--prompt-field", "problem", "--id-field", "uid",
        "-n", "2", "--seed", "7", "--system-prompt", "Be brief.", "--quiet",
        "--preset", "conservative", "--js-threshold", "0.3", "--max-tokens", "50",
    )  # fmt: skip
    totals, coord, summary = await _run(job, settings)
    assert (totals.ok, totals.failed, totals.skipped, totals.total) == (10, 0, 0, 10)
    records = list(iter_records(out))
    assert sorted(_keys(out)) == sorted((f"q{i}", k) for i in range(5) for k in range(2))
    first = next(r for r in records if r["id"] == "q0" and r["sample_index"] == 1)
    seed = sample_seed(7, ("q0", 1))
    steps = fake_steps(seed)
    assert first["status"] == "ok"
    assert first["seed"] == seed
    assert first["position"] == 0
    assert first["completion_token_ids"] == [s.token_id for s in steps]
    assert first["completion"] == "".join(token_text(s.token_id) for s in steps)
    assert first["finish_reason"] == "stop"
    assert first["prompt"] == {
        "teacher": {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Problem number 0?"},
            ]
        },
        "base": {"text": "Be brief.\n\nQuestion: Problem number 0?\nAnswer:"},
    }
    assert first["prompt_token_ids"]["base"] == list(first["prompt"]["base"]["text"].encode())
    assert first["usage"]["completion_tokens"] == len(steps)
    assert first["usage"]["total_tokens"] == first["usage"]["prompt_tokens"] + len(steps)
    # preset conservative, then the explicit js threshold on top
    assert first["mixing"]["preset"] == "conservative"
    assert first["mixing"]["trust_region_top_p"] == 0.90
    assert first["mixing"]["js_threshold"] == 0.3
    assert first["mixing"]["overlap_threshold"] == 0.15
    assert first["sampling"]["max_tokens"] == 50
    assert first["models"] == {"base": "scripted-base", "teacher": "scripted-teacher"}
    summary_record = first["summary"]
    assert summary_record["tokens"] == len(steps)
    alphas = [s.alpha for s in steps if s.alpha is not None]
    assert summary_record["alpha_mean"] == pytest.approx(sum(alphas) / len(alphas))
    unstable = sum(s.reason == "unstable" for s in steps)
    assert summary_record["fallback_rate"] == pytest.approx(unstable / len(steps))
    assert "diagnostics" not in first
    # one tokenization per prompt, one generation per sample
    assert coord.calls["chat_prompt"] == 5
    assert coord.calls["generate"] == 10
    assert "10 generated, 0 failed" in summary


async def test_templates_and_dataset_fields(dataset: Path, tmp_path: Path) -> None:
    job, settings, _ = parse_job(
        str(dataset), "-o", str(tmp_path / "o.jsonl"), "--prompt-field", "problem",
        "--base-template", "Level {level}. Problem: {prompt}\nSolution:",
        "--teacher-template", "[{system}] {problem}", "--system-prompt", "S", "--quiet",
    )  # fmt: skip
    totals, coord, _ = await _run(job, settings)
    assert totals.ok == 5
    assert coord.calls["completion_prompts"] == 5
    record = next(r for r in iter_records(tmp_path / "o.jsonl") if r["id"] == "4")
    assert record["prompt"]["base"] == {"text": "Level 1. Problem: Problem number 4?\nSolution:"}
    assert record["prompt"]["teacher"] == {"text": "[S] Problem number 4?"}


def test_template_with_unknown_field_is_a_clear_error(dataset: Path, tmp_path: Path) -> None:
    job, settings, _ = parse_job(
        str(dataset), "-o", str(tmp_path / "o.jsonl"), "--prompt-field", "problem",
        "--base-template", "{question}",
    )  # fmt: skip
    from app.batch.datasets import read_rows, to_prompts

    row = to_prompts(read_rows(str(dataset)), prompt_field="problem")[0]
    with pytest.raises(ValueError, match=r"--base-template uses \{question\}"):
        build_prompt(row, job.templates, settings)


def test_default_base_text_is_the_gateways_rendering() -> None:
    """The base sees a dataset conversation exactly as the gateway renders the same chat
    (a "developer" turn is a system turn, not a question)."""
    from app.batch.datasets import Message, PromptRow

    settings = Settings(base_url="http://b", teacher_url="http://t")
    conversation = (Message("developer", "Be brief."), Message("user", "2+2?"))
    row = PromptRow(id="0", position=0, prompt=conversation, fields={})
    spec = build_prompt(row, Templates(), settings)
    assert spec.base_text == "Be brief.\n\nQuestion: 2+2?\nAnswer:"
    assert spec.teacher_messages == conversation


async def test_resume_generates_only_missing_samples(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    argv = [str(dataset), "-o", str(out), "--prompt-field", "problem", "-n", "2", "--quiet"]
    job, settings, _ = parse_job(*argv, "--limit", "2")
    await _run(job, settings)
    assert len(_keys(out)) == 4
    job, settings, _ = parse_job(*argv)
    totals, coord, _ = await _run(job, settings)
    assert (totals.skipped, totals.ok) == (4, 6)
    assert coord.calls["generate"] == 6
    assert sorted(_keys(out)) == sorted((str(i), k) for i in range(5) for k in range(2))
    # Nothing left: the coordinator is not even started.
    totals, coord, _ = await _run(job, settings)
    assert (totals.skipped, totals.ok) == (10, 0)
    assert coord.calls["enter"] == 0


async def test_failures_are_recorded_retried_and_superseded(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    argv = [str(dataset), "-o", str(out), "--prompt-field", "problem", "--quiet"]
    job, settings, _ = parse_job(*argv, "--retries", "2", "--retry-backoff", "0")
    failures: dict[str, Any] = {
        # transient: fails twice, succeeds on the third attempt (within --retries 2)
        "number 1": (2, lambda: UpstreamUnavailableError("down", upstream="base")),
        # permanent in this run: 3 attempts, all fail
        "number 2": (3, lambda: UpstreamUnavailableError("still down", upstream="teacher")),
        # not retryable: one attempt
        "number 3": (-1, lambda: ContextLengthError("prompt too long")),
    }
    coord = ScriptedCoordinator(settings, failures=failures)
    totals, _, summary = await _run(job, settings, coord)
    assert (totals.ok, totals.failed) == (3, 2)
    assert coord.calls["failures"] == 2 + 3 + 1
    by_id = {r["id"]: r for r in iter_records(out)}
    assert by_id["1"]["status"] == "ok"
    assert by_id["1"]["attempts"] == 3
    assert by_id["2"]["status"] == "failed"
    assert by_id["2"]["attempts"] == 3
    assert by_id["2"]["error"] == {
        "type": "UpstreamUnavailableError",
        "status": 503,
        "message": "still down",
    }
    assert by_id["3"]["attempts"] == 1
    assert by_id["3"]["error"]["status"] == 400
    assert "completion" not in by_id["3"]
    assert "2 sample(s) failed" in summary

    # Resume: the failed ones are retried; "2" now works, "3" fails again.
    coord = ScriptedCoordinator(settings, failures={"number 3": failures["number 3"]})
    totals, _, summary = await _run(job, settings, coord)
    assert (totals.skipped, totals.ok, totals.failed) == (3, 1, 1)
    keys = _keys(out)
    assert len(keys) == len(set(keys)) == 5  # compacted: exactly one record per sample
    assert [k[0] for k in keys] == ["0", "1", "2", "3", "4"]  # in dataset order
    by_id = {r["id"]: r for r in iter_records(out)}
    assert by_id["2"]["status"] == "ok"
    assert by_id["3"]["status"] == "failed"
    assert "compacted: dropped 2 superseded" in summary


async def test_changed_options_refuse_to_resume(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    argv = [str(dataset), "-o", str(out), "--prompt-field", "problem", "--quiet"]
    job, settings, _ = parse_job(*argv, "--limit", "2")
    await _run(job, settings)
    job, settings, _ = parse_job(*argv, "--trust-region-top-p", "none")
    with pytest.raises(StoreError, match="different options"):
        await _run(job, settings)
    job, settings, _ = parse_job(*argv, "--trust-region-top-p", "none", "--allow-config-change")
    totals, _, _ = await _run(job, settings)
    assert (totals.skipped, totals.ok) == (2, 3)


async def test_shards_split_one_dataset(dataset: Path, tmp_path: Path) -> None:
    keys: list[tuple[str, int]] = []
    for index in range(3):
        out = tmp_path / f"shard{index}.jsonl"
        job, settings, _ = parse_job(
            str(dataset), "-o", str(out), "--prompt-field", "problem", "--id-field", "uid",
            "-n", "2", "--shard", f"{index}/3", "--quiet",
        )  # fmt: skip
        await _run(job, settings)
        records = list(iter_records(out))
        assert {r["shard"] for r in records} == {f"{index}/3"}
        keys.extend(_keys(out))
    assert sorted(keys) == sorted((f"q{i}", k) for i in range(5) for k in range(2))
    assert len(keys) == len(set(keys))


async def test_diagnostics_carry_per_token_columns_and_text(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    job, settings, _ = parse_job(
        str(dataset), "-o", str(out), "--prompt-field", "problem", "--diagnostics", "--quiet"
    )
    _, coord, _ = await _run(job, settings)
    assert coord.calls["stream"] == 5
    assert coord.calls["generate"] == 0
    for record in iter_records(out):
        diag = record["diagnostics"]
        steps = fake_steps(record["seed"])
        n = len(steps)
        assert {len(v) for v in diag.values()} == {n}
        assert diag["token_ids"] == record["completion_token_ids"]
        assert diag["alpha"] == [s.alpha for s in steps]
        assert diag["reason"] == [s.reason for s in steps]
        assert "".join(diag["token_text"]) == record["completion"]
        # the held-back first piece is released with the finish event, on the last token
        assert diag["token_text"][0] == ""
        assert record["finish_reason"] == "length"
        assert record["mixing"]["diagnostics"] is True


def test_cli_reports_missing_settings(
    dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("DUAL_VLLM_BASE_URL", raising=False)
    monkeypatch.delenv("DUAL_VLLM_TEACHER_URL", raising=False)
    code = cli_main(["generate", str(dataset), "-o", str(tmp_path / "o.jsonl")])
    assert code == 2
    err = capsys.readouterr().err
    assert "base_url" in err
    assert "DUAL_VLLM_BASE_URL" in err


def test_cli_reports_dataset_errors(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli_main(
        ["generate", str(dataset), "-o", str(tmp_path / "o.jsonl"), "--prompt-field", "nope",
         "--base-url", "http://127.0.0.1:9", "--teacher-url", "http://127.0.0.1:9"]
    )  # fmt: skip
    assert code == 2
    assert "has no field 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists() or (tmp_path / "o.jsonl").read_text() == ""


def test_progress_postfix() -> None:
    from app.batch.records import SampleOutput, Totals

    totals = Totals(total=2)
    steps = fake_steps(3)
    totals.add(SampleOutput("x", [1], "stop", None, 1, len(steps), steps))
    postfix = totals.postfix()
    alphas = [s.alpha for s in steps if s.alpha is not None]
    assert postfix["α"] == f"{sum(alphas) / len(alphas):.3f}"
    unstable = Counter(s.reason for s in steps)["unstable"]
    assert postfix["fallback"] == f"{unstable / len(steps):.1%}"
    assert json.dumps(totals.as_dict())


async def test_upstreams_down_stop_the_job(dataset: Path, tmp_path: Path) -> None:
    from app.batch.runner import JobAborted

    out = tmp_path / "out.jsonl"
    job, settings, _ = parse_job(
        str(dataset), "-o", str(out), "--prompt-field", "problem", "-n", "2", "--quiet",
        "--concurrency", "1", "--retries", "1", "--retry-backoff", "0",
        "--max-consecutive-failures", "3",
    )  # fmt: skip
    down: dict[str, Any] = {
        "Problem": (-1, lambda: UpstreamUnavailableError("connection refused", upstream="base"))
    }
    coord = ScriptedCoordinator(settings, failures=down)
    with pytest.raises(JobAborted, match="3 consecutive samples failed"):
        await _run(job, settings, coord)
    records = list(iter_records(out))
    assert [r["status"] for r in records] == ["failed"] * 3  # the other 7 are untouched
    assert coord.calls["failures"] == 3 * 2
    # Upstreams back: the rerun generates all ten, superseding the three failures.
    totals, _, _ = await _run(job, settings)
    assert (totals.ok, totals.failed, totals.skipped) == (10, 0, 0)
    keys = _keys(out)
    assert len(keys) == len(set(keys)) == 10


def _slow_first_prompt() -> dict[str, Any]:
    """Prompt 0 fails twice before it succeeds: it completes after the others."""
    return {"number 0": (2, lambda: UpstreamUnavailableError("down", upstream="base"))}


@pytest.mark.parametrize("completion_order", [False, True])
async def test_the_finished_file_is_in_dataset_order(
    dataset: Path, tmp_path: Path, completion_order: bool
) -> None:
    out = tmp_path / "out.jsonl"
    argv = [str(dataset), "-o", str(out), "--prompt-field", "problem", "-n", "2", "--quiet"]
    argv += ["--concurrency", "4", "--retries", "2", "--retry-backoff", "0.05"]
    job, settings, _ = parse_job(*argv, *(["--completion-order"] if completion_order else []))
    await _run(job, settings, ScriptedCoordinator(settings, failures=_slow_first_prompt()))
    keys = _keys(out)
    in_dataset_order = [(str(i), k) for i in range(5) for k in range(2)]
    if completion_order:
        assert sorted(keys) == in_dataset_order
        assert keys[-1][0] == "0"  # the retried prompt finished last, and stays last
    else:
        assert keys == in_dataset_order


async def test_parquet_output_is_written_from_the_compacted_store(
    dataset: Path, tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    out = tmp_path / "samples.parquet"
    argv = [str(dataset), "-o", str(out), "--prompt-field", "problem", "--id-field", "uid"]
    argv += ["-n", "2", "--diagnostics", "--quiet", "--retries", "0"]
    failures: dict[str, Any] = {"number 3": (-1, lambda: ContextLengthError("too long"))}
    job, settings, _ = parse_job(*argv)
    assert job.output_format == "parquet"
    await _run(job, settings, ScriptedCoordinator(settings, failures=failures))
    store = tmp_path / "samples.parquet.partial.jsonl"
    records = list(iter_records(store))
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 10
    assert [(r["id"], r["sample_index"]) for r in rows] == _keys(store)
    for row, record in zip(rows, records, strict=True):
        assert row["status"] == record["status"]
        assert row["seed"] == record["seed"]
        assert row["prompt"] == record["prompt"]
        if record["status"] == "ok":
            assert row["completion"] == record["completion"]
            assert row["completion_token_ids"] == record["completion_token_ids"]
            assert row["diagnostics"]["alpha"] == record["diagnostics"]["alpha"]
            assert row["error"] is None
        else:
            assert row["error"] == record["error"]
            assert row["completion"] is None
    assert {r["id"] for r in rows if r["status"] == "failed"} == {"q3"}
    # A rerun resumes from the store: only the failed samples are generated again.
    totals, coord, _ = await _run(job, settings)
    assert (totals.skipped, coord.calls["stream"]) == (8, 2)  # (diagnostics: streamed)
    rows = pq.read_table(out).to_pylist()
    assert [(r["id"], r["sample_index"]) for r in rows] == _keys(store)
    assert [r["status"] for r in rows] == ["ok"] * 10


async def test_hf_datasets_folder(dataset: Path, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "samples"
    job, settings, _ = parse_job(
        str(dataset), "-o", str(out), "--output-format", "hf", "--prompt-field", "problem",
        "--quiet",
    )  # fmt: skip
    await _run(job, settings)
    loaded = datasets.load_from_disk(str(out))
    assert len(loaded) == 5
    assert loaded[0]["id"] == "0"
    assert (
        loaded[4]["completion"]
        == next(iter_records(tmp_path / "samples.partial.jsonl"))["completion"]
        or loaded[4]["id"] == "4"
    )


def test_hf_output_without_datasets_is_a_clear_error(
    dataset: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    code = cli_main(
        [
            "generate", str(dataset), "-o", str(tmp_path / "hf"), "--output-format", "hf",
            "--prompt-field", "problem",
            "--base-url", "http://127.0.0.1:9", "--teacher-url", "http://127.0.0.1:9",
        ]
    )  # fmt: skip
    assert code == 2
    assert "needs the Hugging Face `datasets` package" in capsys.readouterr().err
    assert not (tmp_path / "hf.partial.jsonl").exists()
