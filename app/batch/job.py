"""A `generate` job's configuration and its prompts as the two models see them.

`Job` holds everything the job needs besides Settings (the command line builds it in
app.batch.cli; tests build it directly). Its mixing and sampling records are what each output
record stores and what the config hash covers; `plan` reads the dataset, keeps this shard's
prompts and builds every prompt up front, so a template naming a missing field fails at once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from app.batch.datasets import (
    DatasetError,
    Message,
    PromptRow,
    SampleKey,
    Shard,
    read_rows,
    select_shard,
    to_prompts,
)
from app.batch.export import store_path
from app.batch.writer import ResultStore, StoreError
from app.coordinator import render_base_chat
from app.generation import ChatMessage, GenerationParams
from app.options import MIX_OPTIONS
from app.settings import Settings


@dataclass(frozen=True, slots=True)
class PromptSpec:
    """One prompt as sent: teacher messages (chat template) or text, and the base text."""

    base_text: str
    teacher_messages: tuple[Message, ...] | None = None
    teacher_text: str | None = None

    def as_record(self) -> dict[str, Any]:
        teacher: dict[str, Any] = (
            {"messages": [asdict(m) for m in self.teacher_messages]}
            if self.teacher_messages is not None
            else {"text": self.teacher_text}
        )
        return {"teacher": teacher, "base": {"text": self.base_text}}


@dataclass(frozen=True, slots=True)
class Templates:
    system_prompt: str | None = None
    teacher_template: str | None = None
    base_template: str | None = None


@dataclass(frozen=True)
class Job:
    """Everything `generate` needs besides Settings; built from the command line or by tests."""

    dataset: str
    output: Path
    fmt: str | None = None
    split: str = "train"
    hf_config: str | None = None
    prompt_field: str = "prompt"
    id_field: str | None = None
    limit: int | None = None
    shard: Shard | None = None
    samples: int = 1
    seed: int = 0
    concurrency: int = 8
    retries: int = 3
    retry_backoff: float = 1.0
    max_consecutive_failures: int = 32
    templates: Templates = field(default_factory=Templates)
    params: GenerationParams = field(default_factory=GenerationParams)
    preset: str | None = None
    diagnostics: bool = False
    allow_config_change: bool = False
    quiet: bool = False
    fsync_interval: float = 1.0
    output_format: str = "jsonl"  # jsonl, parquet or hf (app.batch.export)
    completion_order: bool = False  # keep the finished file in completion order

    @property
    def store_path(self) -> Path:
        """The resumable JSONL: the output itself, or `<output>.partial.jsonl` next to a
        Parquet file / datasets folder."""
        return store_path(self.output, self.output_format)

    def mixing_record(self) -> dict[str, Any]:
        """The mixing options used, with README.md's names."""
        mixing = self.params.mixing
        record: dict[str, Any] = {"preset": self.preset}
        record.update({name: getattr(mixing, name) for name in MIX_OPTIONS})
        record["top_k"] = self.params.top_k_upstream
        record["diagnostics"] = self.diagnostics
        return record

    def sampling_record(self) -> dict[str, Any]:
        p = self.params
        return {
            "max_tokens": p.max_tokens,
            "temperature": p.mixing.temperature,
            "top_p": p.mixing.top_p,
            "top_k": p.mixing.top_k,
            "stop": list(p.stop),
            "stop_token_ids": list(p.stop_token_ids),
            "ignore_eos": p.ignore_eos,
            "job_seed": self.seed,
        }

    def config_hash(self) -> str:
        """What must not change between a run and its resume (ids and seeds aside)."""
        payload = {
            "mixing": self.mixing_record(),
            "sampling": self.sampling_record(),
            "templates": asdict(self.templates),
            "prompt_field": self.prompt_field,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def check_config(job: Job, store: ResultStore, keys: set[SampleKey]) -> None:
    """Refuse to resume over samples of this job made with other options (unless allowed)."""
    expected = job.config_hash()
    changed = sum(
        1 for key in store.state.done & keys if store.config_hashes.get(key) not in (None, expected)
    )
    if changed and not job.allow_config_change:
        raise StoreError(
            f"{job.store_path} holds {changed} sample(s) of this job made with different options "
            "(mixing, sampling, templates or prompt field). Use another --output, or pass "
            "--allow-config-change to keep them and generate only the missing ones."
        )


# --------------------------------------------------------------------------------------------
# Prompts as the two models see them


def _fill(template: str, row: PromptRow, prompt: str, system: str | None, option: str) -> str:
    values = {**row.fields, "prompt": prompt, "system": system or ""}
    try:
        return template.format_map(values)
    except KeyError as exc:
        raise DatasetError(
            f"{option} uses {{{exc.args[0]}}} but row {row.position} has no such field "
            f"(available: prompt, system, {', '.join(sorted(row.fields))})"
        ) from None
    except (ValueError, IndexError) as exc:
        raise DatasetError(f"{option} is not a valid template: {exc}") from None


def build_prompt(row: PromptRow, templates: Templates, settings: Settings) -> PromptSpec:
    if isinstance(row.prompt, str):
        messages: tuple[Message, ...] = (Message("user", row.prompt),)
    else:
        messages = row.prompt
    system = templates.system_prompt
    if system is not None and messages[0].role != "system":
        messages = (Message("system", system), *messages)
    system_text = next((m.content for m in messages if m.role == "system"), None)
    last_user = next((m.content for m in reversed(messages) if m.role == "user"), "")

    if templates.base_template is not None:
        base_text = _fill(templates.base_template, row, last_user, system_text, "--base-template")
    else:
        chat = [ChatMessage(m.role, m.content) for m in messages]
        base_text = render_base_chat(settings, chat)
    if templates.teacher_template is not None:
        teacher_text = _fill(
            templates.teacher_template, row, last_user, system_text, "--teacher-template"
        )
        return PromptSpec(base_text=base_text, teacher_text=teacher_text)
    return PromptSpec(base_text=base_text, teacher_messages=messages)


def plan(job: Job, settings: Settings) -> list[tuple[PromptRow, PromptSpec]]:
    rows = read_rows(job.dataset, fmt=job.fmt, split=job.split, hf_config=job.hf_config)
    if job.limit is not None:
        rows = rows[: job.limit]
    prompts = select_shard(
        to_prompts(rows, prompt_field=job.prompt_field, id_field=job.id_field), job.shard
    )
    # Every prompt is built before any generation so template errors show up at once.
    return [(row, build_prompt(row, job.templates, settings)) for row in prompts]
