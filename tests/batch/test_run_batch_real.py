"""`dual-vllm run-batch` through the real CPU vLLM pair: a mixed completions/chat batch with
per-line settings; each answered line equals a direct POST of its body to the gateway (same
seed, same tokens), bad lines get their own error records, and a rerun is a no-op."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from app.main import create_app
from app.settings import Settings
from tests.real_vllm import RealVLLM

pytestmark = pytest.mark.real_vllm

ROOT = Path(__file__).resolve().parents[2]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"

LINES: list[tuple[str, str, dict[str, Any]]] = [
    (
        "chat-greedy",
        CHAT,
        {"messages": [{"role": "user", "content": "What is 2+2?"}], "temperature": 0,
         "max_tokens": 12},
    ),
    (
        "completion-stop",
        COMPLETIONS,
        {"prompt": "The capital of France is", "max_tokens": 10, "seed": 1, "stop": ["."],
         "return_token_ids": True},
    ),
    (
        "chat-base-prompt-conservative",
        CHAT,
        {"messages": [{"role": "user", "content": "Name a primary colour."}],
         "base_prompt": "Question: Name a primary colour.\nAnswer:", "max_tokens": 10, "seed": 2,
         "mixing": {"preset": "conservative", "diagnostics": True}},
    ),
    (
        "completion-alpha",
        COMPLETIONS,
        {"prompt": "Once upon a time", "max_tokens": 8, "seed": 3, "temperature": 0.7,
         "mixing": {"alpha": 0.3}},
    ),
    ("chat-empty-messages", CHAT, {"messages": [], "max_tokens": 4}),
]  # fmt: skip


def _batch(path: Path) -> Path:
    lines = [
        json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})
        for cid, url, body in LINES
    ]
    lines.insert(2, "{not json")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUAL_VLLM_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "app", *argv],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


def _stable(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in ("id", "created")}


async def test_run_batch_through_the_real_pair(
    real_vllm: RealVLLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, out = _batch(tmp_path / "batch.jsonl"), tmp_path / "out.jsonl"
    argv = ["run-batch", "-i", str(source), "-o", str(out), "--concurrency", "1", "--quiet"]
    argv += ["--base-url", real_vllm.base_url, "--teacher-url", real_vllm.teacher_url]
    done = _cli(*argv)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["custom_id"] for r in records] == [
        "chat-greedy", "completion-stop", None, "chat-base-prompt-conservative",
        "completion-alpha", "chat-empty-messages",
    ]  # fmt: skip
    assert records[2]["response"]["status_code"] == 400
    assert "not valid JSON" in records[2]["error"]

    # The same bodies POSTed to the gateway (same settings: nothing from the environment).
    for name in [k for k in os.environ if k.startswith("DUAL_VLLM_")]:
        monkeypatch.delenv(name)
    settings = Settings(base_url=[real_vllm.base_url], teacher_url=[real_vllm.teacher_url])
    app = create_app(settings)
    answered = [r for r in records if r["custom_id"] is not None]
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://gw", timeout=300
        ) as client:
            for (custom_id, url, body), record in zip(LINES, answered, strict=True):
                direct = await client.post(url, json=body)
                assert record["custom_id"] == custom_id
                assert record["response"]["status_code"] == direct.status_code, custom_id
                if direct.status_code == 200:
                    assert record["error"] is None
                    assert _stable(record["response"]["body"]) == _stable(direct.json())
                else:
                    assert record["response"]["body"] is None
                    assert record["error"] == direct.json()
    ok = {r["custom_id"]: r["response"]["body"] for r in answered if r["error"] is None}
    assert len(ok) == 4
    assert ok["completion-stop"]["choices"][0]["token_ids"]
    assert ok["completion-stop"]["choices"][0]["text"].count(".") == 0
    diagnostics = ok["chat-base-prompt-conservative"]["choices"][0]["diagnostics"]
    assert diagnostics["reason"][0] == "first_token"
    assert ok["chat-greedy"]["usage"]["completion_tokens"] <= 12

    # A rerun: every line already answered, the same file.
    before = out.read_bytes()
    again = _cli(*argv)
    assert again.returncode == 0, again.stderr
    assert "6 already done" in again.stderr
    assert out.read_bytes() == before
