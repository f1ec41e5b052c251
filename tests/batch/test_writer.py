"""Crash safety of the resumable JSONL store (app/batch/writer.py)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from app.batch.writer import ResultStore, StoreError, final_records, iter_records


def _rec(prompt_id: str, index: int, status: str = "ok", **extra: Any) -> dict[str, Any]:
    return {"id": prompt_id, "sample_index": index, "status": status, **extra}


def test_append_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    with ResultStore(path) as store:
        assert store.state.done == set()
        store.append(_rec("a", 0, completion="x\ny"))
        store.append(_rec("a", 1, status="failed"))
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    assert len(lines) == 3
    assert json.loads(lines[0])["completion"] == "x\ny"
    with ResultStore(path) as store:
        assert store.state.done == {("a", 0)}
        assert store.state.failed == {("a", 1)}
        assert store.state.superseded == 0


def test_torn_last_line_is_truncated(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    whole = json.dumps(_rec("a", 0)) + "\n" + json.dumps(_rec("b", 0)) + "\n"
    path.write_text(whole + '{"id": "c", "sample_index": 0, "sta')
    with ResultStore(path) as store:
        assert store.state.done == {("a", 0), ("b", 0)}
        assert store.state.truncated_bytes == len('{"id": "c", "sample_index": 0, "sta')
        assert path.read_text() == whole
        store.append(_rec("c", 0))
    assert [r["id"] for r in iter_records(path)] == ["a", "b", "c"]


def test_torn_line_that_is_valid_json_prefix_is_still_dropped(tmp_path: Path) -> None:
    # `{"id":"a","sample_index":0}` without its newline parses, but was never completed.
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(_rec("a", 0)))
    with ResultStore(path) as store:
        assert store.state.done == set()
    assert path.read_bytes() == b""


def test_corrupt_middle_line_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(_rec("a", 0)) + "\nnot json\n" + json.dumps(_rec("b", 0)) + "\n")
    with pytest.raises(StoreError, match="line 2"):
        ResultStore(path).open()
    # The failed open released the lock.
    path.write_text("")
    with ResultStore(path):
        pass


def test_one_writer_per_file(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    with ResultStore(path), pytest.raises(StoreError, match="another process"):
        ResultStore(path).open()


def test_last_record_wins_and_compaction_is_exactly_once(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    with ResultStore(path) as store:
        store.append(_rec("b", 0, status="failed", attempt=1))
        store.append(_rec("a", 0, attempt=1))
        store.append(_rec("b", 0, attempt=2))
        assert store.state.superseded == 1
        assert [(r["id"], r["attempt"]) for r in final_records(path)] == [("b", 2), ("a", 1)]
        dropped = store.compact(order={("a", 0): 0, ("b", 0): 1})
        assert dropped == 1
        store.append(_rec("c", 0))  # still appendable after the rename
    records = list(iter_records(path))
    assert [(r["id"], r.get("attempt")) for r in records] == [("a", 1), ("b", 2), ("c", None)]
    assert not list(tmp_path.glob(".out.jsonl.compact-*"))


def test_stale_compaction_temporary_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(_rec("a", 0)) + "\n")
    stale = tmp_path / ".out.jsonl.compact-999"
    stale.write_text("partial")
    with ResultStore(path) as store:
        assert store.state.done == {("a", 0)}
    assert not stale.exists()


def test_non_finite_floats_are_stored_as_null(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    with ResultStore(path) as store:
        store.append(_rec("a", 0, diagnostics={"chernoff": [math.inf, 0.5, math.nan]}))
    (record,) = iter_records(path)
    assert record["diagnostics"]["chernoff"] == [None, 0.5, None]
    assert "Infinity" not in path.read_text()


def test_failed_write_is_rolled_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "out.jsonl"
    with ResultStore(path) as store:
        store.append(_rec("a", 0))
        real_write = os.write
        calls = {"n": 0}

        def half_then_fail(fd: int, data: memoryview) -> int:
            calls["n"] += 1
            if calls["n"] == 1:
                return real_write(fd, bytes(data[:5]))
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "write", half_then_fail)
        with pytest.raises(OSError, match="No space"):
            store.append(_rec("b", 0))
        monkeypatch.setattr(os, "write", real_write)
        store.append(_rec("c", 0))
    assert [r["id"] for r in iter_records(path)] == ["a", "c"]


def test_parquet_export_keeps_every_field_and_stores_mixed_columns_as_json(
    tmp_path: Path,
) -> None:
    import pyarrow.parquet as pq

    from app.batch.export import write_parquet

    records = [
        _rec("a", 0, stop_reason=None, usage={"prompt_tokens": 3}),
        _rec("a", 1, stop_reason="\n", error={"type": "X", "status": 400, "message": "m"}),
        _rec("b", 0, stop_reason=2, usage={"prompt_tokens": 4, "base_prompt_tokens": None}),
    ]
    out = tmp_path / "out.parquet"
    write_parquet(records, out)
    rows = pq.read_table(out).to_pylist()
    assert [(r["id"], r["sample_index"]) for r in rows] == [("a", 0), ("a", 1), ("b", 0)]
    assert [r["stop_reason"] for r in rows] == [None, '"\\n"', "2"]  # a string or an id: JSON
    assert rows[0]["error"] is None
    assert rows[1]["error"] == {"type": "X", "status": 400, "message": "m"}
    assert rows[2]["usage"] == {"prompt_tokens": 4, "base_prompt_tokens": None}
    assert not list(tmp_path.glob(".out.parquet.tmp-*"))
