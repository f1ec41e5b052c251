"""app.batch.records.sample_record: the record of one sample, ok or failed, without a job run
(field order is the output format; end-to-end records: test_generate.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.batch.datasets import Message, PromptRow, parse_shard
from app.batch.job import Job, PromptSpec
from app.batch.records import SCHEMA_VERSION, Outcome, SampleOutput, sample_record
from app.diagnostics import sample_summary, token_columns
from app.errors import ContextLengthError
from app.generation import DualPrompt
from tests.batch.scripted import fake_steps

ROW = PromptRow(id="q7", position=3, prompt="Why?", fields={"level": "2"})
SPEC = PromptSpec(base_text="Question: Why?\nAnswer:", teacher_messages=(Message("user", "Why?"),))
DUAL = DualPrompt(teacher=[1, 2, 3, 4], base=[5, 6, 7])
MODELS = {"base": "b-model", "teacher": "t-model"}


def _record(job: Job, outcome: Outcome) -> dict[str, Any]:
    return sample_record(
        job, ROW, 1, SPEC, outcome,
        seed=42, models=MODELS, elapsed_seconds=0.12345, config_hash="abc",
    )  # fmt: skip


def _output(token_text: list[str] | None = None) -> SampleOutput:
    steps = fake_steps(5)
    ids = [s.token_id for s in steps]
    return SampleOutput("hello", ids, "stop", None, 4, len(ids), steps, token_text)


def test_ok_record_fields_in_order() -> None:
    job = Job(dataset="d.jsonl", output=Path("o.jsonl"), shard=parse_shard("1/4"))
    output = _output()
    record = _record(job, Outcome(2, DUAL, output=output))
    assert list(record) == [
        "schema", "id", "sample_index", "status", "position", "shard", "seed", "prompt",
        "models", "prompt_token_ids", "completion", "completion_token_ids", "finish_reason",
        "stop_reason", "usage", "mixing", "sampling", "summary", "attempts", "elapsed_seconds",
        "config_hash",
    ]  # fmt: skip
    assert record["schema"] == SCHEMA_VERSION
    assert (record["id"], record["sample_index"], record["position"]) == ("q7", 1, 3)
    assert (record["status"], record["shard"], record["seed"]) == ("ok", "1/4", 42)
    assert record["prompt"] == {
        "teacher": {"messages": [{"role": "user", "content": "Why?"}]},
        "base": {"text": "Question: Why?\nAnswer:"},
    }
    assert record["models"] == MODELS
    assert record["prompt_token_ids"] == {"teacher": [1, 2, 3, 4], "base": [5, 6, 7]}
    assert record["completion"] == "hello"
    assert record["completion_token_ids"] == output.token_ids
    assert (record["finish_reason"], record["stop_reason"]) == ("stop", None)
    n = len(output.steps)
    assert record["usage"] == {
        "prompt_tokens": 4,
        "base_prompt_tokens": 3,
        "completion_tokens": n,
        "total_tokens": 4 + n,
    }
    assert record["mixing"] == job.mixing_record()
    assert record["sampling"] == job.sampling_record()
    assert record["summary"] == sample_summary(output.steps)
    assert (record["attempts"], record["elapsed_seconds"], record["config_hash"]) == (
        2,
        0.123,
        "abc",
    )


def test_ok_record_with_diagnostics_has_token_columns_and_text() -> None:
    job = Job(dataset="d.jsonl", output=Path("o.jsonl"), diagnostics=True)
    output = _output(token_text=["h", "", "ello"])
    record = _record(job, Outcome(1, DUAL, output=output))
    assert list(record)[-4:] == ["diagnostics", "attempts", "elapsed_seconds", "config_hash"]
    assert record["diagnostics"] == {**token_columns(output.steps), "token_text": ["h", "", "ello"]}
    # without token text (not asked of the coordinator), only the columns
    record = _record(job, Outcome(1, DUAL, output=_output()))
    assert record["diagnostics"] == token_columns(output.steps)


def test_failed_record_has_the_error_and_no_completion() -> None:
    job = Job(dataset="d.jsonl", output=Path("o.jsonl"), diagnostics=True)
    error = ContextLengthError("prompt too long")
    record = _record(job, Outcome(1, DUAL, error=error))
    assert list(record) == [
        "schema", "id", "sample_index", "status", "position", "shard", "seed", "prompt",
        "models", "prompt_token_ids", "mixing", "sampling", "error", "attempts",
        "elapsed_seconds", "config_hash",
    ]  # fmt: skip
    assert (record["status"], record["shard"]) == ("failed", None)
    assert record["error"] == {
        "type": "ContextLengthError",
        "status": 400,
        "message": "prompt too long",
    }


def test_failed_before_tokenization_has_no_prompt_ids() -> None:
    job = Job(dataset="d.jsonl", output=Path("o.jsonl"))
    record = _record(job, Outcome(4, error=TimeoutError("slow")))
    assert "prompt_token_ids" not in record
    assert record["error"] == {"type": "TimeoutError", "status": None, "message": "slow"}
    assert record["attempts"] == 4
