"""Fixtures of the batch tests (helpers live in tests/batch/scripted.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.batch.scripted import write_jsonl


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Five prompts with ids q0..q4 in a `problem` field."""
    rows = [{"uid": f"q{i}", "problem": f"Problem number {i}?", "level": i % 3} for i in range(5)]
    return write_jsonl(tmp_path / "problems.jsonl", rows)
