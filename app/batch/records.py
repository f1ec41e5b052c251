"""What `generate` writes and prints: one record per sample (ok or failed), and the totals.

`sample_record` is a pure function of the job, the prompt and how the sample's attempts ended;
its field order is the output format (docs/BATCH.md), so keep it when adding fields.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.batch.datasets import PromptRow
from app.batch.job import Job, PromptSpec
from app.diagnostics import sample_summary, token_columns
from app.errors import DualVLLMError
from app.generation import DualPrompt
from app.sampling.types import StepResult

SCHEMA_VERSION = 1


@dataclass(slots=True)
class SampleOutput:
    text: str
    token_ids: list[int]
    finish_reason: str
    stop_reason: int | str | None
    prompt_tokens: int
    completion_tokens: int
    steps: list[StepResult]
    token_text: list[str] | None = None
    support_known: bool = True  # False through the gateway (its diagnostics lack it)


@dataclass(slots=True)
class Outcome:
    """How a sample's attempts ended: an output, or the last error. `dual` holds the prompt
    ids once tokenization succeeded (also when generation then failed)."""

    attempts: int
    dual: DualPrompt | None = None
    output: SampleOutput | None = None
    error: BaseException | None = None


def error_record(exc: BaseException) -> dict[str, Any]:
    status = exc.status if isinstance(exc, DualVLLMError) else None
    return {"type": type(exc).__name__, "status": status, "message": str(exc)}


def sample_record(
    job: Job,
    row: PromptRow,
    index: int,
    spec: PromptSpec,
    outcome: Outcome,
    *,
    seed: int,
    models: Mapping[str, str | None],
    elapsed_seconds: float,
    config_hash: str,
) -> dict[str, Any]:
    """The output record of sample `index` of `row`: status "ok" with the completion, usage
    and summary (and per-token columns with job.diagnostics), or "failed" with the error."""
    dual, output = outcome.dual, outcome.output
    record: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "id": row.id,
        "sample_index": index,
        "status": "ok" if output is not None else "failed",
        "position": row.position,
        "shard": str(job.shard) if job.shard else None,
        "seed": seed,
        "prompt": spec.as_record(),
        "models": dict(models),
    }
    if dual is not None:
        record["prompt_token_ids"] = {"teacher": dual.teacher, "base": dual.base}
    elif output is not None:  # through a gateway: generated, but the ids are not known
        record["prompt_token_ids"] = None
    if output is not None:
        record.update(
            completion=output.text,
            completion_token_ids=output.token_ids,
            finish_reason=output.finish_reason,
            stop_reason=output.stop_reason,
            usage={
                "prompt_tokens": output.prompt_tokens,
                "base_prompt_tokens": len(dual.base) if dual is not None else None,
                "completion_tokens": output.completion_tokens,
                "total_tokens": output.prompt_tokens + output.completion_tokens,
            },
        )
    record.update(mixing=job.mixing_record(), sampling=job.sampling_record())
    if output is not None:
        record["summary"] = sample_summary(output.steps)
        if job.diagnostics:
            columns: dict[str, Any] = token_columns(output.steps)
            if not output.support_known:
                columns["support_size"] = [None] * len(output.steps)
            if output.token_text is not None:
                columns["token_text"] = output.token_text
            record["diagnostics"] = columns
    else:
        record["error"] = error_record(outcome.error) if outcome.error is not None else None
    record.update(
        attempts=outcome.attempts,
        elapsed_seconds=round(elapsed_seconds, 3),
        config_hash=config_hash,
    )
    return record


# --------------------------------------------------------------------------------------------
# Progress and totals


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


@dataclass
class Totals:
    total: int = 0
    skipped: int = 0
    ok: int = 0
    failed: int = 0
    tokens: int = 0
    alpha_sum: float = 0.0
    alpha_count: int = 0
    fallback_steps: int = 0
    finish: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)

    def add(self, output: SampleOutput) -> None:
        self.ok += 1
        self.tokens += len(output.steps)
        for step in output.steps:
            if step.alpha is not None:
                self.alpha_sum += step.alpha
                self.alpha_count += 1
            self.fallback_steps += step.reason == "unstable"
        self.finish[output.finish_reason] += 1

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def alpha_mean(self) -> float | None:
        return self.alpha_sum / self.alpha_count if self.alpha_count else None

    @property
    def fallback_rate(self) -> float | None:
        return self.fallback_steps / self.tokens if self.tokens else None

    def postfix(self) -> dict[str, str]:
        return {
            "tok/s": f"{self.tokens_per_second:.1f}",
            "α": _fmt(self.alpha_mean, ".3f"),
            "fallback": _fmt(self.fallback_rate, ".1%"),
            "failed": str(self.failed),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "samples": self.total,
            "already_done": self.skipped,
            "ok": self.ok,
            "failed": self.failed,
            "tokens": self.tokens,
            "seconds": round(self.elapsed, 3),
            "tokens_per_second": round(self.tokens_per_second, 3),
            "alpha_mean": self.alpha_mean,
            "fallback_rate": self.fallback_rate,
            "finish_reasons": dict(self.finish),
        }


def format_summary(totals: Totals, output: Path, compacted: int) -> str:
    finish = ", ".join(f"{k} {v}" for k, v in sorted(totals.finish.items())) or "-"
    lines = [
        f"output: {output}",
        f"samples: {totals.total} in this job ({totals.skipped} already done, "
        f"{totals.ok} generated, {totals.failed} failed)",
        f"tokens: {totals.tokens} in {totals.elapsed:.1f} s ({totals.tokens_per_second:.1f} tok/s)",
        f"alpha mean: {_fmt(totals.alpha_mean, '.4f')}; "
        f"fallback rate: {_fmt(totals.fallback_rate, '.2%')}",
        f"finish reasons: {finish}",
    ]
    if compacted:
        lines.append(f"compacted: dropped {compacted} superseded record(s)")
    if totals.failed:
        lines.append(f"{totals.failed} sample(s) failed: rerun the same command to retry them")
    return "\n".join(lines) + "\n"
