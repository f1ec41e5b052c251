"""`dual-vllm local ...`: argument parsing, messages and exit codes, the `run` life cycle."""

from __future__ import annotations

import io
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.cli import build_parser, main
from app.localvllm import cli as local_cli
from app.localvllm.servers import (
    ServerSpec,
    StartResult,
    default_specs,
    pid_alive,
    read_pid,
    start_pair,
    stop_specs,
)
from app.localvllm.setup import Layout
from tests.localvllm.fakes import fake_command, free_port


@pytest.fixture
def layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Layout:
    monkeypatch.setenv("DUAL_VLLM_CACHE_DIR", str(tmp_path))
    layout = Layout(tmp_path.resolve())
    layout.teacher.mkdir(parents=True)
    layout.base.mkdir(parents=True)
    # The real set-up installs vLLM: out of scope here (tests/localvllm/test_setup.py has it).
    monkeypatch.setattr(local_cli, "run_setup", lambda layout_, out: out.write("setup ok\n"))
    return layout


@pytest.fixture
def ports(layout: Layout) -> Iterator[list[str]]:
    base, teacher = free_port(), free_port()
    yield ["--base-port", str(base), "--teacher-port", str(teacher)]
    stop_specs(layout, default_specs(layout, base, teacher))


def test_sub_commands_parse() -> None:
    args = build_parser("local").parse_args(["local", "start", "--base-port", "9001"])
    assert (args.local_command, args.base_port, args.teacher_port) == ("start", 9001, 8102)
    args = build_parser("local").parse_args(["local", "run", "--port", "8010"])
    assert (args.local_command, args.port) == ("run", 8010)
    with pytest.raises(SystemExit):
        build_parser("local").parse_args(["local", "launch"])


def test_max_logprobs_option_of_start_and_run(
    layout: Layout, ports: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    parse = build_parser("local").parse_args
    assert parse(["local", "start"]).max_logprobs == 1024
    assert parse(["local", "run", "--max-logprobs", "-1"]).max_logprobs == -1
    with pytest.raises(SystemExit):
        parse(["local", "stop", "--max-logprobs", "-1"])
    seen: list[list[ServerSpec]] = []

    def start(layout_: Layout, specs: list[ServerSpec], out: io.StringIO) -> StartResult:
        seen.append(specs)
        return StartResult(launches=[], reused=list(specs))

    monkeypatch.setattr(local_cli, "start_pair", start)
    assert main(["local", "start", *ports, "--max-logprobs", "-1"]) == 0
    assert main(["local", "start", *ports]) == 0
    assert [[spec.max_logprobs for spec in specs] for specs in seen] == [[-1, -1], [1024, 1024]]


def test_status_of_nothing_running(
    layout: Layout, ports: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["local", "status", *ports]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert all("not answering" in line and "PID=-" in line for line in lines)


def test_start_on_a_taken_port_exits_1_naming_it(
    layout: Layout, ports: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", int(ports[1])))
        squatter.listen()
        assert main(["local", "start", *ports]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dual-vllm local start: port ")
    assert f"port {ports[1]} (127.0.0.1) is already in use" in err


def _fake_start(monkeypatch: pytest.MonkeyPatch) -> None:
    def start(layout: Layout, specs: list[ServerSpec], out: io.StringIO) -> object:
        return start_pair(layout, specs, out, timeout=30, command=fake_command)

    monkeypatch.setattr(local_cli, "start_pair", start)


def test_run_starts_the_pair_runs_the_gateway_then_stops_what_it_started(
    layout: Layout,
    ports: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    _fake_start(monkeypatch)
    # The stand-in gateway prints the upstreams it was given and exits.
    names = ("DUAL_VLLM_BASE_URL", "DUAL_VLLM_TEACHER_URL", "DUAL_VLLM_PORT")
    script = f"import os; print('GATEWAY', *(os.environ[n] for n in {names!r}))"
    monkeypatch.setattr(local_cli, "gateway_command", lambda: [sys.executable, "-c", script])
    assert main(["local", "run", *ports, "--port", "8077"]) == 0
    out = capfd.readouterr().out
    base, teacher = default_specs(layout, int(ports[1]), int(ports[3]))
    assert f"GATEWAY {base.url} {teacher.url} 8077" in out
    assert "curl http://127.0.0.1:8077/v1/chat/completions" in out
    assert 'OpenAI(base_url="http://127.0.0.1:8077/v1"' in out
    assert "stopping the vLLM servers this command started" in out
    assert not base.pid_file(layout).exists()
    assert not teacher.pid_file(layout).exists()


def test_run_forwards_ctrl_c_to_the_gateway_and_leaves_a_reused_pair_running(
    layout: Layout,
    ports: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    _fake_start(monkeypatch)
    specs = default_specs(layout, int(ports[1]), int(ports[3]))
    start_pair(layout, specs, io.StringIO(), timeout=30, command=fake_command)  # already up
    pids = [read_pid(spec.pid_file(layout)) for spec in specs]
    script = (
        "import signal, sys, time\n"
        "def stop(*args):\n"
        "    print('gateway got SIGINT', flush=True)\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGINT, stop)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    monkeypatch.setattr(local_cli, "gateway_command", lambda: [sys.executable, "-c", script])
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        assert main(["local", "run", *ports]) == 0
    finally:
        timer.cancel()
    out = capfd.readouterr().out
    assert "gateway got SIGINT" in out
    assert "reusing the healthy smollm2-base" in out
    assert "left running (they were already up)" in out
    assert all(pid is not None and pid_alive(pid) for pid in pids)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
