"""The resumable JSONL store of `generate`: crash-safe appends, recovery, final compaction.

Design (docs/BATCH.md, "Resume semantics"):

- Append-only JSON Lines. Each record is serialised to one complete line (ending in "\\n")
  and handed to the kernel with os.write on an O_APPEND descriptor, so after a kill -9 the
  file holds whole records plus at most one torn last line (a line without its newline:
  a write cut short). fsync runs at most every `fsync_interval` seconds and at close; it only
  matters for power loss, since a killed process's writes are already in the page cache.
- Opening scans the file: a torn tail is truncated away; each record's key is
  (id, sample_index); the LAST record of a key wins. Keys whose last record has status "ok"
  are done; "failed" ones are retried by the next run and superseded by the new record.
- `compact()` rewrites the file so every key appears exactly once (its last record), via a
  temporary file in the same directory, fsync, and an atomic os.replace. The job calls it when
  it ends if any key was written more than once, so a finished file satisfies "every sample
  exactly once" on its own; readers of an unfinished file use `final_records`.
- One writer per file: an exclusive flock on `<output>.lock` (a sidecar, because compaction
  replaces the data file's inode).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.batch.datasets import SampleKey


class StoreError(RuntimeError):
    """The output file cannot be used (locked by another job, corrupt in the middle, ...)."""


def record_key(record: Mapping[str, Any]) -> SampleKey:
    return (str(record["id"]), int(record["sample_index"]))


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: store them as null so every line stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def encode_record(record: Mapping[str, Any]) -> bytes:
    record = _clean(dict(record))
    try:
        text = json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: escape them rather than lose the record
        text = json.dumps(record, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
        return (text + "\n").encode("ascii")


def _scan(data: bytes, name: str) -> tuple[list[tuple[int, dict[str, Any]]], int]:
    """Parse complete lines; returns [(offset, record)] and the length of the valid prefix
    (everything after the last newline is a torn write)."""
    end = data.rfind(b"\n") + 1
    records: list[tuple[int, dict[str, Any]]] = []
    offset = 0
    for number, line in enumerate(data[:end].split(b"\n")[:-1], start=1):
        if line.strip():
            try:
                record = json.loads(line)
                record_key(record)
            except (ValueError, KeyError, TypeError) as exc:
                raise StoreError(
                    f"{name} line {number} is not a generate record ({exc}); the file was "
                    "changed by something else: move it away or fix that line"
                ) from exc
            records.append((offset, record))
        offset += len(line) + 1
    return records, end


def iter_records(path: Path) -> Iterator[dict[str, Any]]:
    """Every complete record in file order (a torn last line is ignored)."""
    records, _ = _scan(path.read_bytes(), path.name)
    for _, record in records:
        yield record


def final_records(path: Path) -> list[dict[str, Any]]:
    """The final view: the last record of each key, in order of each key's first appearance."""
    latest: dict[SampleKey, dict[str, Any]] = {}
    for record in iter_records(path):
        latest[record_key(record)] = record
    return list(latest.values())


@dataclass
class StoreState:
    """What a scan found: the last status of each key, and how much history it carries."""

    status: dict[SampleKey, str] = field(default_factory=dict)
    lines: int = 0
    truncated_bytes: int = 0

    @property
    def done(self) -> set[SampleKey]:
        return {key for key, status in self.status.items() if status == "ok"}

    @property
    def failed(self) -> set[SampleKey]:
        return {key for key, status in self.status.items() if status != "ok"}

    @property
    def superseded(self) -> int:
        return self.lines - len(self.status)


class ResultStore:
    """`with ResultStore(path) as store: state = store.state; store.append(record)`."""

    def __init__(self, path: Path, *, fsync_interval: float = 1.0) -> None:
        self.path = Path(path)
        self.fsync_interval = fsync_interval
        self.state = StoreState()
        self.config_hashes: dict[SampleKey, str | None] = {}
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._size = 0
        self._last_sync = 0.0
        self._dirty = False

    # --- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> ResultStore:
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def open(self) -> StoreState:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise StoreError(
                f"another process is writing {self.path} (lock {lock_path.name} is held)"
            ) from None
        self._lock_fd = lock_fd
        try:
            self._remove_stale_temporaries()
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            self._recover()
        except BaseException:
            self.close()
            raise
        return self.state

    def close(self) -> None:
        if self._fd is not None:
            if self._dirty:
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _remove_stale_temporaries(self) -> None:
        # Left by a compaction that was killed before its os.replace; the data file is intact.
        for stale in self.path.parent.glob(f".{self.path.name}.compact-*"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()

    def _recover(self) -> None:
        if self._fd is None:
            raise StoreError("the store is not open")
        data = self.path.read_bytes()
        records, valid = _scan(data, self.path.name)
        state = StoreState(lines=len(records), truncated_bytes=len(data) - valid)
        if valid < len(data):
            os.ftruncate(self._fd, valid)  # the torn tail of a killed write
            os.fsync(self._fd)
        for _, record in records:
            key = record_key(record)
            state.status[key] = str(record.get("status", "ok"))
            self.config_hashes[key] = record.get("config_hash")
        self.state = state
        self._size = valid

    # --- writing ------------------------------------------------------------------------------

    def append(self, record: Mapping[str, Any]) -> None:
        """Write one record as one complete line; a failed write is rolled back so the file
        never holds a partial line followed by more records."""
        if self._fd is None:
            raise StoreError("the store is not open")
        line = encode_record(record)
        key = record_key(record)
        view = memoryview(line)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise
        self._size += len(line)
        self._dirty = True
        self.state.lines += 1
        self.state.status[key] = str(record.get("status", "ok"))
        self.config_hashes[key] = record.get("config_hash")
        now = time.monotonic()
        if now - self._last_sync >= self.fsync_interval:
            os.fsync(self._fd)
            self._last_sync = now
            self._dirty = False

    def compact(self, order: Mapping[SampleKey, int] | None = None) -> int:
        """Rewrite the file with the last record of each key only, atomically; returns how
        many superseded lines were dropped. `order` (key -> rank) sorts the result, e.g. by
        dataset position; keys it does not know keep their relative order after the rest."""
        if self._fd is None:
            raise StoreError("the store is not open")
        records = final_records(self.path)
        dropped = self.state.lines - len(records)
        if order is not None:
            unknown = len(order)
            records.sort(key=lambda r: order.get(record_key(r), unknown))
        tmp = self.path.with_name(f".{self.path.name}.compact-{os.getpid()}")
        tmp_fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            with os.fdopen(tmp_fd, "wb") as handle:
                for record in records:
                    handle.write(encode_record(record))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        self._size = os.fstat(self._fd).st_size
        self._dirty = False
        self.state.lines = len(records)
        return dropped
