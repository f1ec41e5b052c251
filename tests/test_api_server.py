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

from tests.fakes.vllm import fake_pair, serve_pair
from tests.fakes.vllm import serve as serve_fake

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
            "DUAL_VLLM_STARTUP_TIMEOUT": "0",
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
                # /health answers at once; /ready once the upstreams passed the checks
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
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


def wait_for(url: str, process: subprocess.Popen[str], status: int = 200) -> None:
    deadline = time.monotonic() + 30
    while True:
        assert process.poll() is None, process.communicate()[1]
        try:
            if httpx.get(url, timeout=1).status_code == status:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} never answered {status}"
        time.sleep(0.05)


def start(env: dict[str, str], port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--port", str(port), "--log-level", "info"],
        env={**CLEAN_ENV, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop(process: subprocess.Popen[str]) -> str:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
    return stderr


def test_start_up_waits_for_the_upstreams() -> None:
    """/health at once, /ready and requests 503 until the upstreams answer, then serving."""
    base_port, teacher_port, port = free_port(), free_port(), free_port()
    env = {
        "DUAL_VLLM_BASE_URL": f"http://127.0.0.1:{base_port}",
        "DUAL_VLLM_TEACHER_URL": f"http://127.0.0.1:{teacher_port}",
    }
    url = f"http://127.0.0.1:{port}"
    process = start(env, port)
    try:
        wait_for(f"{url}/health", process)
        ready = httpx.get(f"{url}/ready", timeout=5)
        assert ready.status_code == 503
        assert ready.json()["error"]["code"] == "gateway_starting"
        early = httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}, timeout=5)
        assert early.status_code == 503
        assert early.json()["error"]["code"] == "gateway_starting"
        assert "starting" in early.json()["error"]["message"]
        assert early.headers["retry-after"]
        time.sleep(1.5)  # a few rounds of the start-up checks fail first
        base, teacher = fake_pair()
        with serve_fake(base.app, port=base_port), serve_fake(teacher.app, port=teacher_port):
            wait_for(f"{url}/ready", process)
            answer = httpx.post(
                f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30
            )
            assert answer.status_code == 200, answer.text
            stderr = stop(process)
        assert process.returncode == 0, stderr
        assert "waiting for the upstreams" in stderr
    finally:
        stop(process)


def test_a_start_up_timeout_gives_up() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = serve(
        {
            "DUAL_VLLM_BASE_URL": dead,
            "DUAL_VLLM_TEACHER_URL": dead,
            "DUAL_VLLM_UPSTREAM_RETRIES": "0",
            "DUAL_VLLM_STARTUP_TIMEOUT": "2",
        },
        "--port",
        str(free_port()),
    )
    assert result.returncode == 1
    assert "refusing to start" in result.stderr
    assert "waiting for the upstreams" in result.stderr
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("grace", [30.0, 2.0])
def test_sigterm_drains(grace: float) -> None:
    """SIGTERM: new requests and /ready get 503 while a running stream goes on; it finishes
    within the grace period, or is cut with an error frame and [DONE] at its end."""
    base, teacher = fake_pair(eos_after=None)
    # 60 tokens: ~6 s, longer than the short grace; the short grace still leaves time for the
    # refused request below on a loaded machine (after the grace the gateway exits).
    teacher.faults.latency = 0.1
    with serve_pair(base, teacher) as (base_url, teacher_url, _, _):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {
            "DUAL_VLLM_BASE_URL": base_url,
            "DUAL_VLLM_TEACHER_URL": teacher_url,
            "DUAL_VLLM_SHUTDOWN_GRACE": str(grace),
        }
        process = start(env, port)
        try:
            wait_for(f"{url}/ready", process)
            body = {"prompt": "hi", "max_tokens": 60, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as stream:
                lines = stream.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                assert '"text"' in first
                process.send_signal(signal.SIGTERM)
                time.sleep(0.3)
                refused = httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, timeout=5)
                assert refused.status_code == 503
                assert refused.json()["error"]["code"] == "gateway_draining"
                assert httpx.get(f"{url}/ready", timeout=5).status_code == 503
                rest = [line for line in lines if line.startswith("data: ")]
            assert rest[-1] == "data: [DONE]"
            errors = [line for line in rest if '"error"' in line]
            if grace > 5:
                assert errors == []
                assert any('"finish_reason":"length"' in line for line in rest)
            else:
                assert len(errors) == 1
                assert "gateway_draining" in errors[0]
            stderr = stop(process)
            assert process.returncode == 0, stderr
            assert "Traceback" not in stderr
        finally:
            stop(process)
