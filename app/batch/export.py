"""`generate`'s Parquet and Hugging Face `datasets` outputs, written from the finished JSONL.

The job always writes its resumable JSONL store; with `-o out.parquet` (or `--output-format
parquet`/`hf`) the store is `<output>.partial.jsonl` next to the output, and the output itself
is written here, whole, when a run has attempted every sample: from the compacted store, in
its order, to a temporary that is renamed over the output (so a reader never sees half a
file). Records become rows with the JSONL field names as columns (nested objects as structs);
a column whose values mix types that Arrow cannot hold in one column (e.g. `stop_reason`: a
stop string on one row, a token id on another) is stored as JSON text.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

OUTPUT_FORMATS = ("jsonl", "parquet", "hf")
_PARQUET_SUFFIXES = (".parquet", ".pq")


class ExportError(RuntimeError):
    """The output format cannot be written (a missing optional package, ...)."""


def detect_output_format(output: Path, requested: str | None) -> str:
    if requested is not None:
        return requested
    return "parquet" if output.suffix.lower() in _PARQUET_SUFFIXES else "jsonl"


def store_path(output: Path, output_format: str) -> Path:
    """Where the resumable JSONL lives: the output itself, or `<output>.partial.jsonl`."""
    if output_format == "jsonl":
        return output
    return output.with_name(output.name + ".partial.jsonl")


def _table(records: Sequence[Mapping[str, Any]]) -> Any:
    try:
        import pyarrow as pa
    except ImportError as exc:  # pragma: no cover - pyarrow is in the dev environment
        raise ExportError(
            "writing Parquet or a datasets folder needs pyarrow: pip install 'dual-vllm[data]'"
        ) from exc
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(record))
    columns: dict[str, Any] = {}
    for name in names:
        values = [record.get(name) for record in records]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            columns[name] = pa.array(
                [None if v is None else json.dumps(v, ensure_ascii=False) for v in values],
                type=pa.string(),
            )
    return pa.table(columns) if columns else pa.table({})


def write_parquet(records: Sequence[Mapping[str, Any]], output: Path) -> None:
    import pyarrow.parquet as pq

    table = _table(records)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as exc:
        raise ExportError(
            "--output-format hf needs the Hugging Face `datasets` package: "
            "pip install 'dual-vllm[hf]' (or pip install datasets)"
        ) from exc
    return datasets


def write_hf(records: Sequence[Mapping[str, Any]], output: Path, *, quiet: bool = False) -> None:
    """A `datasets.Dataset` saved with save_to_disk (load it with datasets.load_from_disk)."""
    datasets = _datasets()
    if quiet:
        datasets.disable_progress_bars()
    dataset = datasets.Dataset(_table(records))
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        dataset.save_to_disk(str(tmp))
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_available(output_format: str) -> None:
    """Fail before any generation when the output format's package is missing."""
    if output_format == "hf":
        _datasets()
    if output_format in ("parquet", "hf"):
        _table([])


def export(
    records: Sequence[Mapping[str, Any]], output: Path, output_format: str, *, quiet: bool = False
) -> None:
    if output_format == "parquet":
        write_parquet(records, output)
    elif output_format == "hf":
        write_hf(records, output, quiet=quiet)
