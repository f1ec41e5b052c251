"""`dual-vllm generate` end to end through the real CPU vLLM pair on a 3-prompt JSONL file:
the records are valid (prompts as the servers tokenize them, text = the detokenized ids),
diagnostics are consistent, a rerun resumes to a no-op, and `report` renders the output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.batch.report import PLOTS
from tests.batch.scripted import write_jsonl
from tests.real_vllm import RealVLLM

pytestmark = pytest.mark.real_vllm

ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = ["What is 2+2?", "Name a primary colour.", "What is the capital of France?"]
MAX_TOKENS = 20


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUAL_VLLM_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "app", *argv],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


def _post(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"{url}{path}", json=body, timeout=60)
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


def test_generate_through_the_real_pair(real_vllm: RealVLLM, tmp_path: Path) -> None:
    dataset = write_jsonl(
        tmp_path / "questions.jsonl",
        [{"qid": f"q{i}", "problem": text} for i, text in enumerate(QUESTIONS)],
    )
    out = tmp_path / "out.jsonl"
    argv = [
        "generate", str(dataset), "-o", str(out), "--prompt-field", "problem",
        "--id-field", "qid", "--max-tokens", str(MAX_TOKENS), "--concurrency", "3",
        "--seed", "5", "--diagnostics", "--quiet",
        "--base-url", real_vllm.base_url, "--teacher-url", real_vllm.teacher_url,
    ]  # fmt: skip
    done = _cli(*argv)
    assert done.returncode == 0, done.stderr
    assert "3 generated, 0 failed" in done.stdout

    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["id"] for r in records) == ["q0", "q1", "q2"]
    for record in records:
        assert record["status"] == "ok"
        assert record["models"] == {
            "base": real_vllm.base_model,
            "teacher": real_vllm.teacher_model,
        }
        question = QUESTIONS[int(record["id"][1:])]
        # Prompts as sent: the teacher's own chat template, the base's plain rendering.
        assert record["prompt"]["teacher"] == {"messages": [{"role": "user", "content": question}]}
        assert record["prompt"]["base"]["text"] == f"Question: {question}\nAnswer:"
        teacher_ids = _post(
            real_vllm.teacher_url,
            "/tokenize",
            {
                "model": real_vllm.teacher_model,
                "messages": [{"role": "user", "content": question}],
                "add_generation_prompt": True,
            },
        )["tokens"]
        base_ids = _post(
            real_vllm.base_url,
            "/tokenize",
            {"model": real_vllm.base_model, "prompt": record["prompt"]["base"]["text"]},
        )["tokens"]
        assert record["prompt_token_ids"] == {"teacher": teacher_ids, "base": base_ids}

        ids = record["completion_token_ids"]
        assert 1 <= len(ids) <= MAX_TOKENS
        assert record["finish_reason"] in {"stop", "length"}
        if record["finish_reason"] == "length":
            assert len(ids) == MAX_TOKENS
        text_ids = ids[:-1] if record["finish_reason"] == "stop" else ids  # EOS has no text
        detok = _post(
            real_vllm.teacher_url,
            "/detokenize",
            {"model": real_vllm.teacher_model, "tokens": text_ids},
        )["prompt"]
        assert record["completion"] == detok
        assert record["usage"]["prompt_tokens"] == len(teacher_ids)
        assert record["usage"]["base_prompt_tokens"] == len(base_ids)
        assert record["usage"]["completion_tokens"] == len(ids)

        diag = record["diagnostics"]
        assert all(len(column) == len(ids) for column in diag.values())
        assert diag["token_ids"] == ids
        assert "".join(diag["token_text"]) == record["completion"]
        assert diag["reason"][0] == "first_token"  # forced first token: the teacher's
        assert diag["alpha"][0] == 1.0
        for alpha, reason, gap, lp in zip(
            diag["alpha"], diag["reason"], diag["kl_gap"], diag["logprob"], strict=True
        ):
            assert lp <= 1e-9
            if reason == "single_token":
                assert alpha is None
            else:
                assert 0.0 <= alpha <= 1.0
            if reason == "solved":
                assert gap <= 1e-9
            if reason == "unstable":
                assert alpha == 1.0
        summary = record["summary"]
        alphas = [a for a in diag["alpha"] if a is not None]
        assert summary["tokens"] == len(ids)
        assert summary["alpha_mean"] == pytest.approx(sum(alphas) / len(alphas))
        assert summary["fallback_rate"] == pytest.approx(
            diag["reason"].count("unstable") / len(ids)
        )
        assert summary["logprob_sum"] == pytest.approx(sum(diag["logprob"]))

    # The same command again: everything is done, nothing is generated, the file is unchanged.
    before = out.read_bytes()
    again = _cli(*argv)
    assert again.returncode == 0, again.stderr
    assert "3 already done, 0 generated" in again.stdout
    assert out.read_bytes() == before

    report_dir = tmp_path / "report"
    shown = _cli("report", str(out), "--out-dir", str(report_dir))
    assert shown.returncode == 0, shown.stderr
    for name in (*PLOTS, "report.html", "summary.json"):
        assert (report_dir / name).stat().st_size > 0
    summary_json = json.loads((report_dir / "summary.json").read_text())
    assert summary_json["ok"] == 3
    assert summary_json["tokens"] == sum(len(r["completion_token_ids"]) for r in records)
