"""Readers, field mapping, shards and sample seeds of app/batch/datasets.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.batch.datasets import (
    DatasetError,
    Message,
    Shard,
    parse_shard,
    read_rows,
    sample_seed,
    select_shard,
    to_prompts,
)

ROWS = [
    {"problem": "What is 2+2?", "uid": "a", "answer": "4"},
    {"problem": "Name a prime.", "uid": "b", "answer": "7"},
    {"problem": "Café ☕ — unicode", "uid": "c", "answer": "x"},
]


def _write_all(tmp_path: Path) -> dict[str, Path]:
    paths = {
        "jsonl": tmp_path / "d.jsonl",
        "json": tmp_path / "d.json",
        "csv": tmp_path / "d.csv",
        "parquet": tmp_path / "d.parquet",
    }
    paths["jsonl"].write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS) + "\n\n", encoding="utf-8"
    )
    paths["json"].write_text(json.dumps(ROWS), encoding="utf-8")
    lines = ["problem,uid,answer"] + [f'"{r["problem"]}",{r["uid"]},{r["answer"]}' for r in ROWS]
    paths["csv"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(ROWS), paths["parquet"])
    return paths


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_every_format_reads_the_same_rows(tmp_path: Path, fmt: str) -> None:
    path = _write_all(tmp_path)[fmt]
    rows = read_rows(str(path))
    assert rows == ROWS
    prompts = to_prompts(rows, prompt_field="problem", id_field="uid")
    assert [p.id for p in prompts] == ["a", "b", "c"]
    assert [p.position for p in prompts] == [0, 1, 2]
    assert prompts[2].prompt == "Café ☕ — unicode"
    assert prompts[0].fields["answer"] == "4"


def test_json_variants(tmp_path: Path) -> None:
    wrapped = tmp_path / "w.json"
    wrapped.write_text(json.dumps({"data": ROWS, "version": 1}))
    assert read_rows(str(wrapped)) == ROWS
    lines_named_json = tmp_path / "l.json"
    lines_named_json.write_text("\n".join(json.dumps(r) for r in ROWS))
    assert read_rows(str(lines_named_json)) == ROWS
    explicit = tmp_path / "data.txt"
    explicit.write_text("\n".join(json.dumps(r) for r in ROWS))
    assert read_rows(str(explicit), fmt="jsonl") == ROWS
    with pytest.raises(DatasetError, match="--format"):
        read_rows(str(explicit))


def test_ids_default_to_positions_and_nested_fields(tmp_path: Path) -> None:
    rows = [{"q": {"text": "one"}, "meta": {"id": 10}}, {"q": {"text": "two"}, "meta": {"id": 11}}]
    prompts = to_prompts(rows, prompt_field="q.text")
    assert [(p.id, p.prompt) for p in prompts] == [("0", "one"), ("1", "two")]
    prompts = to_prompts(rows, prompt_field="q.text", id_field="meta.id")
    assert [p.id for p in prompts] == ["10", "11"]


def test_message_lists_become_conversations() -> None:
    rows = [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]}]
    (prompt,) = to_prompts(rows, prompt_field="messages")
    assert prompt.prompt == (Message("system", "S"), Message("user", "U"))
    with pytest.raises(DatasetError, match="role/content"):
        to_prompts([{"messages": [{"role": "user"}]}], prompt_field="messages")


def test_mapping_errors_are_clear() -> None:
    with pytest.raises(DatasetError, match=r"row 1 has no field 'problem' \(fields: question\)"):
        to_prompts([{"problem": "x"}, {"question": "y"}], prompt_field="problem")
    with pytest.raises(DatasetError, match="no id field 'uid'"):
        to_prompts([{"prompt": "x"}], id_field="uid")
    with pytest.raises(DatasetError, match="duplicate id 'a' \\(rows 0 and 2\\)"):
        to_prompts(
            [{"prompt": "x", "i": "a"}, {"prompt": "y", "i": "b"}, {"prompt": "z", "i": "a"}],
            id_field="i",
        )
    with pytest.raises(DatasetError, match="is empty"):
        to_prompts([{"prompt": "  "}])
    with pytest.raises(DatasetError, match="not int"):
        to_prompts([{"prompt": 3}])


def test_missing_file_and_hf_without_datasets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        read_rows(str(tmp_path / "nope.jsonl"))
    # As if `datasets` were not installed (it is, in the dev extra): no network attempt.
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DatasetError, match="needs the `datasets` package"):
        read_rows("agentica-org/DeepScaleR-Preview-Dataset")


def test_bad_jsonl_line_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(DatasetError, match="line 2"):
        read_rows(str(path))


@pytest.mark.parametrize("count", [1, 2, 3, 7, 20])
def test_shards_partition_the_dataset(count: int) -> None:
    prompts = to_prompts([{"prompt": f"p{i}"} for i in range(20)])
    seen: list[str] = []
    sizes = []
    for index in range(count):
        part = select_shard(prompts, parse_shard(f"{index}/{count}"))
        seen.extend(p.id for p in part)
        sizes.append(len(part))
    assert sorted(seen, key=int) == [str(i) for i in range(20)]
    assert len(seen) == len(set(seen)) == 20
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("text", ["1", "a/b", "3/3", "-1/2", "0/0", "1/2/3"])
def test_bad_shards(text: str) -> None:
    with pytest.raises(DatasetError, match="shard"):
        parse_shard(text)


def test_shard_string_and_parse() -> None:
    assert parse_shard("2/5") == Shard(2, 5)
    assert str(Shard(2, 5)) == "2/5"


def test_sample_seeds_are_stable_and_distinct() -> None:
    seeds = {sample_seed(0, (str(i), k)) for i in range(100) for k in range(4)}
    assert len(seeds) == 400
    assert sample_seed(0, ("a", 1)) == sample_seed(0, ("a", 1))
    assert sample_seed(0, ("a", 1)) != sample_seed(1, ("a", 1))
    assert all(0 <= s < 2**63 for s in seeds)
    # Pinned: changing the derivation would silently change every resumed sample.
    assert sample_seed(0, ("a", 0)) == 5377369291220743188
