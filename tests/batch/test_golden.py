"""Characterization tests of `generate`'s output before the batch module is split.

- Resume keeps the LAST record of a key: an output that holds a failed and then an ok record
  of one sample (a run killed before its final compaction) must count the sample as done,
  and the reverse order as failed (retried).
- `--diagnostics` per-token text (`diagnostics.token_text`): the text each token released,
  with the finish text (held back until the end) on the last token, checked against what the
  fake vLLM pair is scripted to produce (decoded independently with tests.fakes.decode).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from app.batch.runner import run_job
from app.batch.writer import ResultStore, final_records, iter_records
from app.coordinator import Coordinator
from app.settings import Settings
from tests.batch.scripted import ScriptedCoordinator, parse_job, write_jsonl
from tests.fakes import (
    BASE_URL,
    EOS_ID,
    TEACHER_URL,
    FakeVLLM,
    decode,
    encode,
    pair_transport,
    scripted,
)

# --- resume: the last record of a key wins -------------------------------------------------


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record) + "\n"


def _earlier_run(path: Path) -> None:
    """What a run killed before compaction leaves: q0 failed then succeeded on a retry, q1
    succeeded and then (a later run) failed."""
    path.write_text(
        _line({"id": "q0", "sample_index": 0, "status": "failed", "error": {"status": 502}})
        + _line({"id": "q1", "sample_index": 0, "status": "ok", "completion": "q1 first"})
        + _line({"id": "q0", "sample_index": 0, "status": "ok", "completion": "q0 retried"})
        + _line({"id": "q1", "sample_index": 0, "status": "failed", "error": {"status": 502}})
    )


def test_reopening_keeps_the_last_record_of_each_key(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    _earlier_run(path)
    with ResultStore(path) as store:
        assert store.state.done == {("q0", 0)}
        assert store.state.failed == {("q1", 0)}
        assert store.state.lines == 4
        assert store.state.superseded == 2
    latest = final_records(path)
    assert [(r["id"], r["status"]) for r in latest] == [("q0", "ok"), ("q1", "failed")]
    assert latest[0]["completion"] == "q0 retried"
    assert len(list(iter_records(path))) == 4  # reopening alone does not compact


async def test_resume_skips_a_key_whose_last_record_is_ok(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    _earlier_run(out)
    job, settings, _ = parse_job(
        str(dataset), "-o", str(out), "--prompt-field", "problem", "--id-field", "uid",
        "--quiet", "--retries", "0",
    )  # fmt: skip
    coord = ScriptedCoordinator(settings)
    summary = io.StringIO()
    totals = await run_job(job, settings, coordinator_factory=lambda _s: coord, stdout=summary)
    # q0's last record is ok: not generated again; q1's last is failed: generated again.
    assert (totals.total, totals.skipped, totals.ok, totals.failed) == (5, 1, 4, 0)
    assert coord.calls["generate"] == 4
    records = list(iter_records(out))
    assert [(r["id"], r["status"]) for r in records] == [(f"q{i}", "ok") for i in range(5)]
    assert records[0]["completion"] == "q0 retried"  # the earlier run's ok record, kept
    assert records[1]["completion"] != "q1 first"  # regenerated, not the superseded one
    assert "dropped 3 superseded record(s)" in summary.getvalue()


# --- --diagnostics token_text against the fake vLLM pair -----------------------------------

_HELD_UTF8 = [*encode("café "), 0xC3 + 3]  # ends with a lone lead byte, then EOS


@pytest.mark.parametrize(
    ("script", "options", "token_ids", "pieces", "finish"),
    [
        pytest.param(
            encode("ok ST"),
            ["--stop", "STOP"],
            [*encode("ok ST"), EOS_ID],
            # "S", "ST" may start "STOP": held back, flushed by the finish at EOS
            ["o", "k", " ", "", "", "ST"],
            ("stop", None),
            id="stop-prefix-flushed-at-eos",
        ),
        pytest.param(
            _HELD_UTF8,
            [],
            [*_HELD_UTF8, EOS_ID],
            # é's first byte releases nothing; the lone last byte is flushed at EOS
            ["c", "a", "f", "", "é", " ", "", "\ufffd"],
            ("stop", None),
            id="utf8-flushed-at-eos",
        ),
        pytest.param(
            encode("abc STOP def"),
            ["--stop", "STOP"],
            encode("abc STOP"),
            ["a", "b", "c", " ", "", "", "", ""],
            ("stop", "STOP"),
            id="stop-string-cut",
        ),
        pytest.param(
            encode("café"),
            ["--max-tokens", "4"],
            [*encode("caf"), 0xC3 + 3],
            ["c", "a", "f", "\ufffd"],
            ("length", None),
            id="utf8-cut-by-length",
        ),
    ],
)
async def test_diagnostics_token_text_is_the_text_each_token_released(
    tmp_path: Path,
    script: list[int],
    options: list[str],
    token_ids: list[int],
    pieces: list[str],
    finish: tuple[str, str | None],
) -> None:
    base = FakeVLLM("base", distribution=scripted(script))
    teacher = FakeVLLM("teacher", distribution=scripted(script))
    dataset = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "prompt": "Say it."}])
    out = tmp_path / "out.jsonl"
    job, _, _ = parse_job(
        str(dataset), "-o", str(out), "--id-field", "id", "--diagnostics", "--quiet",
        "--retries", "0", *options,
    )  # fmt: skip
    settings = Settings(base_url=[BASE_URL], teacher_url=[TEACHER_URL])

    def factory(s: Settings) -> Coordinator:
        return Coordinator(s, transport=pair_transport(base=base, teacher=teacher))

    totals = await run_job(job, settings, coordinator_factory=factory, stdout=io.StringIO())
    assert (totals.ok, totals.failed) == (1, 0)
    (record,) = iter_records(out)
    assert record["completion_token_ids"] == token_ids
    assert (record["finish_reason"], record["stop_reason"]) == finish
    # The expected completion, independently: the fake tokenizer's decoding of the ids
    # that carry text (not a final EOS), cut before a stop string.
    text_ids: Sequence[int] = token_ids[:-1] if token_ids[-1] == EOS_ID else token_ids
    expected = decode(text_ids)
    if finish[1] == "STOP":
        expected = expected[: expected.index("STOP")]
    assert record["completion"] == expected
    token_text = record["diagnostics"]["token_text"]
    assert len(token_text) == len(token_ids) == len(record["diagnostics"]["token_ids"])
    assert "".join(token_text) == expected
    assert token_text == pieces
