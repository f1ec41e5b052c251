"""Dataset readers, field mapping, shard selection and stable sample keys for `generate`.

Local JSONL, JSON, CSV and Parquet files are read here; a name that is not a local path is a
Hugging Face dataset (only when the optional `datasets` package is importable: it is not a
dependency). Every row becomes a `PromptRow` with a stable string id (the `--id-field`, or
the row's position in the dataset) and its position; a sample is keyed by (id, sample index),
never by prompt text, so a resumed job finds its samples again however the file is ordered.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMATS = ("jsonl", "json", "csv", "parquet")
_SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}

SampleKey = tuple[str, int]  # (prompt id, sample index)


class DatasetError(ValueError):
    """A dataset the job cannot use; the message says which file/row/field and what to do."""


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class PromptRow:
    """One prompt of the dataset.

    `prompt` is the text of the user turn, or a whole conversation when the field holds a list
    of `{role, content}` messages. `fields` keeps the row's scalar values (as strings) for
    templates such as `--base-template "Problem: {problem}\\nSolution:"`.
    """

    id: str
    position: int
    prompt: str | tuple[Message, ...]
    fields: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Shard:
    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


# --------------------------------------------------------------------------------------------
# Reading


def detect_format(path: Path) -> str:
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DatasetError(
            f"cannot tell the format of {path.name!r} from its suffix; "
            f"pass --format with one of {', '.join(FORMATS)}"
        )
    return fmt


def read_rows(
    source: str,
    *,
    fmt: str | None = None,
    split: str = "train",
    hf_config: str | None = None,
) -> list[dict[str, Any]]:
    """All rows of a local file or a Hugging Face dataset, as plain dicts."""
    path = Path(source)
    if path.exists():
        if path.is_dir():
            raise DatasetError(f"{source!r} is a directory; give a JSONL/JSON/CSV/Parquet file")
        fmt = fmt or detect_format(path)
        readers = {
            "jsonl": _read_jsonl,
            "json": _read_json,
            "csv": _read_csv,
            "parquet": _read_parquet,
        }
        if fmt not in readers:
            raise DatasetError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
        return readers[fmt](path)
    if fmt is not None or path.suffix.lower() in _SUFFIXES or source.startswith((".", "/")):
        raise DatasetError(f"dataset file {source!r} does not exist")
    return _read_hf(source, split=split, config=hf_config)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path.name} line {number}: invalid JSON ({exc.msg})") from exc
            if not isinstance(value, dict):
                raise DatasetError(f"{path.name} line {number}: expected a JSON object per line")
            rows.append(value)
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines under a .json name
            return _read_jsonl(path)
        raise DatasetError(f"{path.name}: invalid JSON ({exc.msg} at line {exc.lineno})") from exc
    if isinstance(value, dict):
        # {"data": [...]} (or any single list-of-objects member) is a common export shape.
        lists = [v for v in value.values() if isinstance(v, list)]
        if "data" in value and isinstance(value["data"], list):
            value = value["data"]
        elif len(lists) == 1:
            value = lists[0]
    if not isinstance(value, list) or not all(isinstance(row, dict) for row in value):
        raise DatasetError(f"{path.name}: expected a JSON array of objects (or JSON Lines)")
    return value


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        return [dict(row) for row in csv.DictReader(handle)]


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow is in the dev environment
        raise DatasetError("reading Parquet needs pyarrow: pip install 'dual-vllm[data]'") from exc
    rows: list[dict[str, Any]] = pq.read_table(path).to_pylist()
    return rows


def _read_hf(name: str, *, split: str, config: str | None) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as exc:
        raise DatasetError(
            f"{name!r} is not a local file; reading it as a Hugging Face dataset needs the "
            "`datasets` package (pip install datasets) and network access to the Hub"
        ) from exc
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # the Hub client raises many types; say what failed, keep cause
        raise DatasetError(
            f"could not load Hugging Face dataset {name!r} (split {split!r}): {exc}"
        ) from exc
    return [dict(row) for row in dataset]


# --------------------------------------------------------------------------------------------
# Field mapping


def _lookup(row: Mapping[str, Any], field: str) -> Any:
    """`field` or a dotted path into nested objects (`meta.id`); KeyError when absent."""
    if field in row:
        return row[field]
    value: Any = row
    for part in field.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(field)
        value = value[part]
    return value


def _messages(value: list[Any], where: str) -> tuple[Message, ...]:
    messages: list[Message] = []
    for item in value:
        if (
            not isinstance(item, Mapping)
            or not isinstance(item.get("role"), str)
            or not isinstance(item.get("content"), str)
        ):
            raise DatasetError(f"{where}: a message list needs objects with string role/content")
        messages.append(Message(role=item["role"], content=item["content"]))
    if not messages:
        raise DatasetError(f"{where}: the message list is empty")
    return tuple(messages)


def _scalar_fields(row: Mapping[str, Any]) -> dict[str, str]:
    return {
        str(key): str(value)
        for key, value in row.items()
        if isinstance(value, str | int | float | bool)
    }


def to_prompts(
    rows: Sequence[Mapping[str, Any]],
    *,
    prompt_field: str = "prompt",
    id_field: str | None = None,
) -> list[PromptRow]:
    """Map rows to prompts; every problem is a DatasetError naming the row and field."""
    prompts: list[PromptRow] = []
    seen: dict[str, int] = {}
    for position, row in enumerate(rows):
        where = f"row {position}"
        try:
            raw = _lookup(row, prompt_field)
        except KeyError:
            available = ", ".join(sorted(map(str, row))) or "none"
            raise DatasetError(
                f"{where} has no field {prompt_field!r} (fields: {available}); "
                "choose one with --prompt-field"
            ) from None
        prompt: str | tuple[Message, ...]
        if isinstance(raw, str):
            if not raw.strip():
                raise DatasetError(f"{where}: field {prompt_field!r} is empty")
            prompt = raw
        elif isinstance(raw, list):
            prompt = _messages(raw, f"{where} field {prompt_field!r}")
        else:
            raise DatasetError(
                f"{where}: field {prompt_field!r} must be a string or a list of messages, "
                f"not {type(raw).__name__}"
            )
        if id_field is None:
            prompt_id = str(position)
        else:
            try:
                raw_id = _lookup(row, id_field)
            except KeyError:
                raise DatasetError(
                    f"{where} has no id field {id_field!r}; choose one with --id-field "
                    "or leave it out to use row positions"
                ) from None
            if raw_id is None or (isinstance(raw_id, float) and math.isnan(raw_id)):
                raise DatasetError(f"{where}: id field {id_field!r} is empty")
            prompt_id = str(raw_id)
        if prompt_id in seen:
            raise DatasetError(
                f"duplicate id {prompt_id!r} (rows {seen[prompt_id]} and {position}); "
                "ids must be unique so each sample can be found again on resume"
            )
        seen[prompt_id] = position
        prompts.append(
            PromptRow(id=prompt_id, position=position, prompt=prompt, fields=_scalar_fields(row))
        )
    return prompts


# --------------------------------------------------------------------------------------------
# Shards and keys


def parse_shard(text: str) -> Shard:
    """`I/N` with 0 <= I < N (a Kubernetes Indexed Job passes $(JOB_COMPLETION_INDEX))."""
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError:
        raise DatasetError(f"--shard must look like I/N (e.g. 0/4), not {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise DatasetError(f"--shard {text}: need N >= 1 and 0 <= I < N")
    return Shard(index, count)


def select_shard(prompts: Iterable[PromptRow], shard: Shard | None) -> list[PromptRow]:
    """Rows whose dataset position is I modulo N: the shards partition the dataset, and
    interleaving keeps them balanced when difficulty drifts along the file."""
    if shard is None:
        return list(prompts)
    return [p for p in prompts if p.position % shard.count == shard.index]


def sample_seed(seed: int, key: SampleKey) -> int:
    """The seed of one sample, from the job seed and the sample's key only, so a sample
    generated on resume (or on another shard) gets the tokens it would have got anyway."""
    digest = hashlib.sha256(f"{seed}\x00{key[0]}\x00{key[1]}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # 63 bits: fits any int64 consumer
