"""`dual-vllm run-batch` against the fake vLLM pair in process: a mixed completions/chat batch
with per-line settings answers each line exactly as a direct POST of its body to the gateway;
bad lines get their own error records; resume; output order and shape (vLLM's records)."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from app.batch.batchfile import parse_lines, partial_path
from app.batch.runbatch import BatchOptions, run_batch
from app.cli import main as cli_main
from app.main import create_app
from app.settings import Settings
from tests.fakes import (
    BASE_URL,
    TEACHER_URL,
    FakeVLLM,
    fake_pair,
    pair_transport,
    serve,
    serve_pair,
)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def _line(custom_id: str, url: str, body: dict[str, Any], method: str = "POST") -> str:
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# Each valid line's body is deterministic (a seed, or temperature 0), so a direct POST of the
# same body must give the same tokens.
GOOD: list[tuple[str, str, dict[str, Any]]] = [
    ("c-plain", COMPLETIONS, {"prompt": "Say hi.", "max_tokens": 5, "seed": 1}),
    (
        "chat-conservative",
        CHAT,
        {
            "messages": _user("Name a colour."),
            "max_tokens": 9,
            "seed": 2,
            "mixing": {"preset": "conservative"},
        },
    ),
    (
        "c-base-prompt",
        COMPLETIONS,
        {
            "prompt": "Q: 2+2?",
            "base_prompt": "Question: 2+2?\nAnswer:",
            "max_tokens": 12,
            "stop": [" "],
            "seed": 3,
            "mixing": {"alpha": 0.5, "trust_region_top_p": None},
        },
    ),
    (
        "chat-greedy-explore",
        CHAT,
        {
            "messages": [{"role": "system", "content": "Be brief."}, *_user("Hello")],
            "temperature": 0,
            "max_completion_tokens": 6,
            "mixing": {"preset": "explore", "diagnostics": True},
        },
    ),
    (
        "chat-base-prompt",
        CHAT,
        {
            "messages": _user("Count to three."),
            "base_prompt": "Count to three:",
            "max_tokens": 7,
            "seed": 7,
            "top_p": 0.9,
            "logprobs": True,
            "top_logprobs": 2,
        },
    ),
    (
        "c-n2",
        COMPLETIONS,
        {"prompt": ["One", "Two"], "n": 2, "max_tokens": 4, "seed": 9, "return_token_ids": True},
    ),
    # An invalid body: the API's own 400 (and a model the gateway does not serve: its 404).
    ("c-bad-temperature", COMPLETIONS, {"prompt": "x", "temperature": 5, "seed": 1}),
    ("chat-unknown-model", CHAT, {"model": "gpt-4", "messages": _user("x"), "seed": 1}),
]


def _batch_text() -> str:
    lines = [_line(custom_id, url, body) for custom_id, url, body in GOOD]
    lines.insert(2, '{"custom_id": "broken", "method": "POST", "url": ')  # malformed JSON
    lines.insert(4, "")  # empty lines are skipped, as vLLM does
    lines += [
        _line("embed", "/v1/embeddings", {"input": "x"}),
        _line("get", COMPLETIONS, {"prompt": "x"}, method="GET"),
        _line("streamed", CHAT, {"messages": _user("x"), "stream": True}),
        _line("c-plain", COMPLETIONS, {"prompt": "again"}),  # duplicate custom_id
    ]
    return "\n".join(lines) + "\n"


@pytest.fixture
def fakes() -> tuple[FakeVLLM, FakeVLLM]:
    return fake_pair(eos_after=6)


def _settings(**overrides: Any) -> Settings:
    return Settings(base_url=[BASE_URL], teacher_url=[TEACHER_URL], **overrides)


async def _run(
    tmp_path: Path,
    fakes: tuple[FakeVLLM, FakeVLLM],
    text: str,
    *,
    name: str = "out.jsonl",
    **options: Any,
) -> tuple[Any, list[dict[str, Any]], str]:
    source = tmp_path / "batch.jsonl"
    source.write_text(text, encoding="utf-8")
    out = tmp_path / name
    base, teacher = fakes
    err = io.StringIO()
    totals = await run_batch(
        BatchOptions(input=str(source), output=str(out), quiet=True, **options),
        _settings(),
        transport=pair_transport(base=base, teacher=teacher),
        stderr=err,
    )
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    return totals, records, err.getvalue()


async def _direct(
    fakes: tuple[FakeVLLM, FakeVLLM], requests: list[tuple[str, dict[str, Any]]]
) -> list[httpx.Response]:
    """The same bodies POSTed to the gateway app over its HTTP interface."""
    base, teacher = fakes
    app = create_app(_settings(), transport=pair_transport(base=base, teacher=teacher))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            return [await client.post(url, json=body) for url, body in requests]


def _stable(body: dict[str, Any]) -> dict[str, Any]:
    """A response body without what differs between two calls (its id and timestamp)."""
    return {k: v for k, v in body.items() if k not in ("id", "created")}


async def test_each_line_is_answered_as_the_http_api_answers_its_body(
    tmp_path: Path, fakes: tuple[FakeVLLM, FakeVLLM]
) -> None:
    totals, records, summary = await _run(tmp_path, fakes, _batch_text(), concurrency=4)
    ids = [r["custom_id"] for r in records]
    # One record per non-empty input line, in input order (a broken line has no custom_id).
    assert ids == [
        "c-plain", "chat-conservative", None, "c-base-prompt", "chat-greedy-explore",
        "chat-base-prompt", "c-n2", "c-bad-temperature", "chat-unknown-model",
        "embed", "get", "streamed", "c-plain",
    ]  # fmt: skip
    assert (totals.lines, totals.ok, totals.errors, totals.failed) == (13, 6, 7, 0)
    assert "13 (0 already done, 6 ok, 7 error records, 0 failed)" in summary
    for record in records:
        assert list(record) == ["id", "custom_id", "response", "error"]
        assert record["id"].startswith("batch_req_")
        assert list(record["response"]) == ["status_code", "request_id", "body"]

    direct = await _direct(fakes, [(url, body) for _, url, body in GOOD])
    by_id = {r["custom_id"]: r for r in records[:9] if r["custom_id"] is not None}
    for (custom_id, _, _), expected in zip(GOOD, direct, strict=True):
        record = by_id[custom_id]
        assert record["response"]["status_code"] == expected.status_code, custom_id
        if expected.status_code == 200:
            body = record["response"]["body"]
            assert record["error"] is None
            assert record["response"]["request_id"] == body["id"]
            assert _stable(body) == _stable(expected.json()), custom_id
        else:
            assert record["response"]["body"] is None
            assert record["error"] == expected.json(), custom_id
    assert by_id["c-bad-temperature"]["response"]["status_code"] == 400
    assert by_id["chat-unknown-model"]["response"]["status_code"] == 404
    # The per-line settings were honoured (not only "same as direct"):
    assert len(by_id["c-n2"]["response"]["body"]["choices"]) == 4
    assert "token_ids" in by_id["c-n2"]["response"]["body"]["choices"][0]
    greedy = by_id["chat-greedy-explore"]["response"]["body"]["choices"][0]
    assert greedy["diagnostics"]["reason"][0] != "first_token"  # explore: no forced token
    assert by_id["chat-base-prompt"]["response"]["body"]["choices"][0]["logprobs"] is not None
    usage = by_id["c-plain"]["response"]["body"]["usage"]
    assert usage["completion_tokens"] <= 5

    # Lines the API never sees: status 400 and vLLM's plain message.
    errors = {i: records[i]["error"] for i in (2, 9, 10, 11, 12)}
    assert "not valid JSON" in errors[2]
    assert errors[9].startswith("URL /v1/embeddings was used. Supported endpoints:")
    assert "only POST" in errors[10]
    assert errors[11] == "Request must not be sent in stream mode"
    assert "duplicate custom_id 'c-plain' (first on line 1)" in errors[12]
    for i in errors:
        assert records[i]["response"]["status_code"] == 400
        assert records[i]["response"]["body"] is None


async def test_rerun_is_a_no_op_and_a_changed_line_is_redone(
    tmp_path: Path, fakes: tuple[FakeVLLM, FakeVLLM]
) -> None:
    text = _batch_text()
    _, first, _ = await _run(tmp_path, fakes, text)
    base, _ = fakes
    calls = base.calls["/v1/completions"]
    totals, again, _ = await _run(tmp_path, fakes, text)
    assert (totals.skipped, totals.ok, totals.errors) == (13, 0, 0)
    assert again == first  # the same records, ids included
    assert base.calls["/v1/completions"] == calls  # the gateway was not even started

    changed = text.replace('"max_tokens": 5, "seed": 1', '"max_tokens": 3, "seed": 1')
    totals, third, _ = await _run(tmp_path, fakes, changed)
    assert (totals.skipped, totals.ok) == (12, 1)
    assert third[0]["response"]["body"]["usage"]["completion_tokens"] <= 3
    assert third[1:] == first[1:]
    # The store was compacted: one record per line.
    store = partial_path(tmp_path / "out.jsonl").read_text().splitlines()
    assert len(store) == 13


async def test_upstream_failures_are_retried_by_the_next_run(
    tmp_path: Path, fakes: tuple[FakeVLLM, FakeVLLM]
) -> None:
    text = "\n".join(
        _line(f"r{i}", COMPLETIONS, {"prompt": f"Prompt {i}", "max_tokens": 4, "seed": i})
        for i in range(4)
    )
    base, _ = fakes
    # Every completion call of the base after the start-up probe fails: 502 from the gateway.
    base.faults.status, base.faults.status_after = 500, 1
    totals, records, summary = await _run(tmp_path, fakes, text, retries=1, retry_backoff=0)
    assert totals.failed == 4
    assert {r["response"]["status_code"] for r in records} == {502}
    assert all(r["error"]["error"]["type"] for r in records)  # the API's error object
    assert all(r["response"]["body"] is None for r in records)
    assert "rerun to retry them" in summary
    base.faults.status = None
    totals, records, _ = await _run(tmp_path, fakes, text)
    assert (totals.skipped, totals.ok, totals.failed) == (0, 4, 0)
    assert [r["custom_id"] for r in records] == ["r0", "r1", "r2", "r3"]
    assert all(r["response"]["status_code"] == 200 for r in records)


def test_parse_lines_keys() -> None:
    lines = parse_lines(
        _line("a", CHAT, {"messages": _user("x")}) + "\n\n"
        + "[1, 2]\n"
        + _line("a", CHAT, {"messages": _user("y")}) + "\n"
        + json.dumps({"custom_id": 5, "method": "POST", "url": CHAT, "body": {}}) + "\n"
    )  # fmt: skip
    assert [(line.number, line.key, line.custom_id) for line in lines] == [
        (1, "custom_id:a", "a"),
        (3, "line:3", None),
        (4, "line:4", "a"),
        (5, "line:5", None),
    ]
    assert lines[0].error is None
    assert lines[1].error is not None
    assert "custom_id" in (lines[3].error or "")


@pytest.fixture
def served_file(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """Serve one text over real HTTP (an input given as a URL)."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    texts: dict[str, str] = {}

    async def get(request: Any) -> PlainTextResponse:
        return PlainTextResponse(texts["batch"])

    with serve(Starlette(routes=[Route("/batch.jsonl", get)])) as url:

        def publish(text: str) -> str:
            texts["batch"] = text
            return f"{url}/batch.jsonl"

        yield publish


async def test_input_from_a_url_and_output_to_stdout(
    fakes: tuple[FakeVLLM, FakeVLLM], served_file: Callable[[str], str]
) -> None:
    text = _line("only", COMPLETIONS, {"prompt": "Hi", "max_tokens": 3, "seed": 4}) + "\n"
    base, teacher = fakes
    out = io.StringIO()
    totals = await run_batch(
        BatchOptions(input=served_file(text), output="-", quiet=True),
        _settings(),
        transport=pair_transport(base=base, teacher=teacher),
        stdout=out,
        stderr=io.StringIO(),
    )
    assert totals.ok == 1
    (record,) = [json.loads(line) for line in out.getvalue().splitlines()]
    assert record["custom_id"] == "only"
    assert record["response"]["status_code"] == 200


def test_cli_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DUAL_VLLM_BASE_URL", raising=False)
    monkeypatch.delenv("DUAL_VLLM_TEACHER_URL", raising=False)
    out = str(tmp_path / "o.jsonl")
    assert cli_main(["run-batch", "-i", str(tmp_path / "nope.jsonl"), "-o", out]) == 2
    assert "DUAL_VLLM_BASE_URL" in capsys.readouterr().err
    upstreams = ["--base-url", "http://127.0.0.1:9", "--teacher-url", "http://127.0.0.1:9"]
    assert cli_main(["run-batch", "-i", str(tmp_path / "nope.jsonl"), "-o", out, *upstreams]) == 2
    assert "cannot read" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# kill -9 and resume (a real subprocess against the fakes on real ports)

ROOT = Path(__file__).resolve().parents[2]


def _kill_batch() -> str:
    lines = []
    for i in range(10):
        if i % 2:
            body: dict[str, Any] = {"messages": _user(f"Question {i}?"), "max_tokens": 8}
            url = CHAT
        else:
            body, url = {"prompt": f"Prompt {i}:", "max_tokens": 8}, COMPLETIONS
        body.update(seed=100 + i, mixing={"diagnostics": True})
        lines.append(_line(f"k{i}", url, body))
    lines.insert(4, "not json")
    # Longer than the fake's context (2048): the API's 400, on every run.
    lines.insert(7, _line("too-long", COMPLETIONS, {"prompt": "x" * 2100, "seed": 1}))
    return "\n".join(lines) + "\n"


def _cmd(source: Path, out: Path, base_url: str, teacher_url: str) -> list[str]:
    return [
        sys.executable, "-m", "app", "run-batch", "-i", str(source), "-o", str(out),
        "--concurrency", "3", "--quiet", "--base-url", base_url, "--teacher-url", teacher_url,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUAL_VLLM_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_kill_9_then_resume_answers_every_line_exactly_once(tmp_path: Path) -> None:
    base, teacher = fake_pair(eos_after=8)
    source = tmp_path / "batch.jsonl"
    source.write_text(_kill_batch(), encoding="utf-8")
    with serve_pair(base, teacher) as (base_url, teacher_url, _, _):
        reference = tmp_path / "reference.jsonl"
        done = subprocess.run(
            _cmd(source, reference, base_url, teacher_url),
            env=_env(), capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        expected = [json.loads(line) for line in reference.read_text().splitlines()]

        base.faults.latency = teacher.faults.latency = 0.01
        out = tmp_path / "out.jsonl"
        store = partial_path(out)
        rng = random.Random(99)
        kills = 0
        for _ in range(3):
            proc = subprocess.Popen(
                _cmd(source, out, base_url, teacher_url),
                env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            target = _lines(store) + rng.randint(1, 3)
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                if _lines(store) >= target:
                    time.sleep(rng.uniform(0.0, 0.1))
                    break
                time.sleep(0.005)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(timeout=30)
        assert kills >= 2, "the batch finished before it could be killed: make it slower"
        assert not out.exists()  # the output appears only once every line has a record

        final = subprocess.run(
            _cmd(source, out, base_url, teacher_url),
            env=_env(), capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert final.returncode == 0, final.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["custom_id"] for r in records] == [r["custom_id"] for r in expected]  # no gaps
    stored = [json.loads(line)["id"] for line in store.read_text().splitlines()]
    assert len(stored) == len(set(stored)) == len(records)  # exactly once, compacted
    for got, want in zip(records, expected, strict=True):
        assert got["response"]["status_code"] == want["response"]["status_code"]
        if want["response"]["body"] is not None:
            # Same body, same seed: the resumed line got the tokens of the uninterrupted run.
            assert _stable(got["response"]["body"]) == _stable(want["response"]["body"])
        else:
            assert got["error"] == want["error"]
    statuses = [r["response"]["status_code"] for r in records]
    assert statuses.count(400) == 2
