"""`dual-vllm serve` as a user runs it (a subprocess): clear one-line failures without a
traceback, and a real start against the fake pair that stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.fakes.vllm import serve_pair

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("DUAL_VLLM_")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def serve(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", "serve", *args],
        env={**CLEAN_ENV, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_missing_settings_exit_2_naming_the_variable() -> None:
    result = serve({})
    assert result.returncode == 2
    assert "DUAL_VLLM_BASE_URL" in result.stderr
    assert "DUAL_VLLM_TEACHER_URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreachable_upstream_refuses_to_start_without_a_traceback() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    result = serve(
        {
            "DUAL_VLLM_BASE_URL": dead,
            "DUAL_VLLM_TEACHER_URL": dead,
            "DUAL_VLLM_UPSTREAM_RETRIES": "0",
        },
        "--port",
        str(free_port()),
    )
    assert result.returncode == 1
    assert "refusing to start" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_taken_port_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve(
            {"DUAL_VLLM_BASE_URL": "http://b", "DUAL_VLLM_TEACHER_URL": "http://t"},
            "--port",
            str(port),
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def pair_env() -> Iterator[dict[str, str]]:
    with serve_pair() as (base_url, teacher_url, _base, _teacher):
        yield {"DUAL_VLLM_BASE_URL": base_url, "DUAL_VLLM_TEACHER_URL": teacher_url}


def test_serve_answers_and_stops_cleanly_on_sigterm(pair_env: dict[str, str]) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--port", str(port), "--log-level", "warning"],
        env={**CLEAN_ENV, **pair_env, "DUAL_VLLM_MODEL_NAME": "mix"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, process.communicate()[1]
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the gateway did not come up"
            time.sleep(0.1)
        models = httpx.get(f"{url}/v1/models", timeout=5).json()
        assert [m["id"] for m in models["data"]] == ["mix"]
        completion = httpx.post(
            f"{url}/v1/completions",
            json={"model": "mix", "prompt": "hi", "max_tokens": 2},
            timeout=30,
        )
        assert completion.status_code == 200
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 0, stderr
        assert "Traceback" not in stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
