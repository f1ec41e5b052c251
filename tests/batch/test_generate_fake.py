"""`generate` through the real Coordinator against fake vLLM servers on real ports: record
contents, kill -9 at random moments then resume (a real subprocess), and failed samples that
are recorded, then retried and superseded on resume."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.batch.runner import run_job
from app.batch.writer import final_records, iter_records
from tests.batch.scripted import parse_job, write_jsonl
from tests.fakes import EOS_ID, FakeVLLM, apply_chat_template, decode, encode, serve_pair

ROOT = Path(__file__).resolve().parents[2]

PROMPTS = [
    "What is 2+2?",
    "Name a prime number.",
    "Café au lait, s'il vous plaît.",
    "Write one word.",
    "Count to three.",
    "Why is the sky blue?",
    "Say hello.",
]


@pytest.fixture
def upstreams() -> Iterator[tuple[str, str, FakeVLLM, FakeVLLM]]:
    base, teacher = FakeVLLM("base", eos_after=8), FakeVLLM("teacher", eos_after=8)
    with serve_pair(base, teacher) as pair:
        yield pair


def _dataset(tmp_path: Path, *, too_long: bool = False, count: int = len(PROMPTS)) -> Path:
    rows = [{"id": f"p{i}", "question": text} for i, text in enumerate(PROMPTS[:count])]
    if too_long:
        # Longer than the fake's max_model_len (2048): fails on every attempt, on every run.
        rows.insert(3, {"id": "long", "question": "x" * 2100})
    return write_jsonl(tmp_path / "questions.jsonl", rows)


def _check_record(record: dict[str, object]) -> None:
    """A record as the fake upstreams must have produced it."""
    prompt = record["prompt"]
    ids = record["prompt_token_ids"]
    assert isinstance(prompt, dict)
    assert isinstance(ids, dict)
    messages = prompt["teacher"]["messages"]
    assert ids["teacher"] == encode(apply_chat_template(messages, add_generation_prompt=True))
    assert ids["base"] == encode(prompt["base"]["text"])
    tokens = record["completion_token_ids"]
    assert isinstance(tokens, list)
    assert tokens
    text_ids = tokens[:-1] if tokens[-1] == EOS_ID else tokens
    assert record["completion"] == decode(text_ids)
    usage = record["usage"]
    assert isinstance(usage, dict)
    assert usage["completion_tokens"] == len(tokens)
    assert usage["prompt_tokens"] == len(ids["teacher"])


async def test_end_to_end_records_against_fake_vllm(
    upstreams: tuple[str, str, FakeVLLM, FakeVLLM], tmp_path: Path
) -> None:
    base_url, teacher_url, _, _ = upstreams
    out = tmp_path / "out.jsonl"
    job, _, args = parse_job(
        str(_dataset(tmp_path, count=4)), "-o", str(out), "--prompt-field", "question",
        "--id-field", "id", "-n", "2", "--diagnostics", "--max-tokens", "12", "--quiet",
    )  # fmt: skip
    from app.batch.cli import settings_from_args

    args.base_url, args.teacher_url = base_url, teacher_url
    settings = settings_from_args(args)
    totals = await run_job(job, settings, stdout=io.StringIO())
    assert (totals.ok, totals.failed) == (8, 0)
    records = list(iter_records(out))
    assert len(records) == 8
    for record in records:
        _check_record(record)
        diag = record["diagnostics"]
        n = len(record["completion_token_ids"])
        assert all(len(column) == n for column in diag.values())
        assert diag["reason"][0] == "first_token"
        assert diag["alpha"][0] == 1.0
        assert all(a is None or 0.0 <= a <= 1.0 for a in diag["alpha"])
        gaps = [g for g, r in zip(diag["kl_gap"], diag["reason"], strict=True) if r == "solved"]
        assert all(g <= 1e-9 for g in gaps)
        # The per-token pieces are the completion, token by token.
        assert "".join(diag["token_text"]) == record["completion"]
        assert record["summary"]["tokens"] == n
        assert record["models"] == {"base": "fake-base", "teacher": "fake-teacher"}
    # Same seed, same key: the two samples of a prompt differ, samples are reproducible.
    by_key = {(r["id"], r["sample_index"]): r["completion_token_ids"] for r in records}
    assert sum(by_key[(f"p{i}", 0)] != by_key[(f"p{i}", 1)] for i in range(4)) >= 3


def _generate_cmd(dataset: Path, out: Path, base_url: str, teacher_url: str) -> list[str]:
    return [
        sys.executable, "-m", "app", "generate", str(dataset), "-o", str(out),
        "--prompt-field", "question", "--id-field", "id", "-n", "2", "--max-tokens", "10",
        "--concurrency", "3", "--retries", "1", "--retry-backoff", "0", "--seed", "11",
        "--base-url", base_url, "--teacher-url", teacher_url, "--quiet", "--diagnostics",
    ]  # fmt: skip


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUAL_VLLM_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_kill_9_then_resume_gives_every_sample_exactly_once(
    upstreams: tuple[str, str, FakeVLLM, FakeVLLM], tmp_path: Path
) -> None:
    base_url, teacher_url, base, teacher = upstreams
    dataset = _dataset(tmp_path, too_long=True, count=4)
    keys = {(f"p{i}", k) for i in range(4) for k in range(2)} | {
        ("long", 0),
        ("long", 1),
    }

    # Reference: one uninterrupted run (no latency).
    reference = tmp_path / "reference.jsonl"
    done = subprocess.run(
        _generate_cmd(dataset, reference, base_url, teacher_url),
        env=_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr  # the too-long prompt's samples failed
    expected = {(r["id"], r["sample_index"]): r for r in iter_records(reference)}
    assert set(expected) == keys

    # Now slowly, killed with SIGKILL at random moments, then resumed each time.
    base.faults.latency = teacher.faults.latency = 0.01
    out = tmp_path / "out.jsonl"
    rng = random.Random(1234)
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen(
            _generate_cmd(dataset, out, base_url, teacher_url),
            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        start_lines = out.read_bytes().count(b"\n") if out.exists() else 0
        target = start_lines + rng.randint(1, 3)
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if out.exists() and out.read_bytes().count(b"\n") >= target:
                time.sleep(rng.uniform(0.0, 0.15))  # somewhere inside the next sample
                break
            time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=30)
        assert proc.stderr is not None
        proc.stderr.close()
    assert kills >= 2, "the job finished before it could be killed: make it slower"

    final = subprocess.run(
        _generate_cmd(dataset, out, base_url, teacher_url),
        env=_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert final.returncode == 1, final.stderr
    assert "2 sample(s) failed" in final.stdout

    data = out.read_bytes()
    assert data.endswith(b"\n")
    records = [json.loads(line) for line in data.splitlines()]
    got = [(r["id"], r["sample_index"]) for r in records]
    assert len(got) == len(set(got))  # exactly once: the file itself, not just a view
    assert set(got) == keys  # no gaps
    for record in records:
        key = (record["id"], record["sample_index"])
        if record["id"] == "long":
            assert record["status"] == "failed"
            assert record["error"]["status"] == 400
            continue
        assert record["status"] == "ok"
        _check_record(record)
        # A resumed sample is the sample an uninterrupted run makes (seed from the key).
        assert record["completion_token_ids"] == expected[key]["completion_token_ids"]
        assert record["diagnostics"]["alpha"] == expected[key]["diagnostics"]["alpha"]


async def test_failed_samples_are_retried_on_resume(
    upstreams: tuple[str, str, FakeVLLM, FakeVLLM], tmp_path: Path
) -> None:
    base_url, teacher_url, base, _ = upstreams
    out = tmp_path / "out.jsonl"
    job, _, args = parse_job(
        str(_dataset(tmp_path, count=5)), "-o", str(out), "--prompt-field", "question",
        "--id-field", "id", "--max-tokens", "10", "--concurrency", "1", "--retries", "1",
        "--retry-backoff", "0", "--quiet",
    )  # fmt: skip
    from app.batch.cli import settings_from_args

    args.base_url, args.teacher_url = base_url, teacher_url
    settings = settings_from_args(args)
    # The base upstream breaks (HTTP 500, not retried by the client) after 20 completion calls
    # and stays broken for this run: later samples fail after the job's own retry.
    base.faults.status, base.faults.status_after = 500, 20
    totals = await run_job(job, settings, stdout=io.StringIO())
    assert totals.ok >= 1
    assert totals.failed >= 1
    assert totals.ok + totals.failed == 5
    failed = [r for r in iter_records(out) if r["status"] == "failed"]
    assert len(failed) == totals.failed
    for record in failed:
        assert record["attempts"] == 2
        assert record["error"]["status"] == 502
        assert "completion" not in record

    base.faults.status = None
    summary = io.StringIO()
    totals = await run_job(job, settings, stdout=summary)
    assert totals.ok == len(failed)
    assert totals.failed == 0
    records = final_records(out)
    assert [r["id"] for r in records] == [f"p{i}" for i in range(5)]
    assert all(r["status"] == "ok" for r in records)
    assert len(list(iter_records(out))) == 5  # compacted
    assert f"dropped {len(failed)} superseded" in summary.getvalue()
