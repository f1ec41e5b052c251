"""Start/stop of the server pair with stand-in servers: the bad cases and the idempotent start."""

from __future__ import annotations

import io
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from app.localvllm import LocalVLLMError
from app.localvllm.servers import (
    ServerSpec,
    StartResult,
    default_specs,
    is_our_server,
    launch,
    pid_alive,
    read_pid,
    running_max_logprobs,
    server_command,
    server_env,
    start_pair,
    status,
    stop_launched,
    stop_specs,
)
from app.localvllm.setup import Layout
from tests.localvllm.fakes import (
    dying_command,
    fake_command,
    free_port,
    silent_command,
    slow_command,
)


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    layout = Layout(tmp_path)
    layout.teacher.mkdir(parents=True)
    layout.base.mkdir(parents=True)
    return layout


@pytest.fixture
def specs(layout: Layout) -> Iterator[list[ServerSpec]]:
    specs = default_specs(layout, free_port(), free_port())
    yield specs
    stop_specs(layout, specs)  # never leave a stand-in running


def test_command_and_environment_follow_real_vllm_md(layout: Layout) -> None:
    base, teacher = default_specs(layout)
    command = server_command(layout, teacher)
    assert command[:3] == [str(layout.python), "-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(command)
    for flag in (
        f"--model {layout.teacher}",
        "--served-model-name smollm2-teacher",
        "--host 127.0.0.1",
        "--port 8102",
        "--dtype float32",
        "--max-model-len 2048",
        "--max-logprobs 1024",
        "--enforce-eager",
        "--enable-tokenizer-info-endpoint",
        "--enable-prompt-tokens-details",
        "--generation-config vllm",
    ):
        assert flag in joined
    assert (base.port, base.served_name, base.model_dir) == (8101, "smollm2-base", layout.base)
    env_base, env_teacher = server_env(base, {}), server_env(teacher, {})
    assert env_base["HF_HUB_OFFLINE"] == "1"  # no hub: the models are local folders
    assert env_base["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert env_base["VLLM_NO_USAGE_STATS"] == "1"
    assert env_base["DO_NOT_TRACK"] == "1"
    assert (env_base["VLLM_CPU_OMP_THREADS_BIND"], env_teacher["VLLM_CPU_OMP_THREADS_BIND"]) == (
        "0",
        "1",
    )


def test_start_waits_warms_up_then_reuses_and_stop_kills_by_pid(
    layout: Layout, specs: list[ServerSpec]
) -> None:
    out = io.StringIO()
    result = start_pair(layout, specs, out, timeout=30, command=fake_command)
    assert result.started == specs
    assert result.reused == []
    pids = [read_pid(spec.pid_file(layout)) for spec in specs]
    assert all(
        pid is not None and is_our_server(pid, spec) for pid, spec in zip(pids, specs, strict=True)
    )
    for spec in specs:
        assert httpx.get(f"{spec.url}/v1/models").json()["data"][0]["id"] == spec.served_name
        assert "fake vLLM listening" in spec.log_file(layout).read_text()
    assert "healthy after" in out.getvalue()

    again = start_pair(layout, specs, io.StringIO(), timeout=30, command=fake_command)
    assert again.started == []
    assert again.reused == specs
    assert all("healthy" in line and "PID=" in line for line in status(layout, specs))

    out = io.StringIO()
    stop_specs(layout, specs, out)
    assert [pid_alive(pid) for pid in pids if pid is not None] == [False, False]
    assert not any(spec.pid_file(layout).exists() for spec in specs)
    assert "stopped PID" in out.getvalue()
    assert all("not answering" in line for line in status(layout, specs))


def test_max_logprobs_is_chosen_per_spec(layout: Layout) -> None:
    assert [spec.max_logprobs for spec in default_specs(layout)] == [1024, 1024]
    specs = default_specs(layout, max_logprobs=-1)
    assert [spec.max_logprobs for spec in specs] == [-1, -1]
    assert "--max-logprobs -1" in " ".join(server_command(layout, specs[1]))
    assert "--max-logprobs 1024" not in " ".join(server_command(layout, specs[0]))


def _command_with_max_logprobs(layout: Layout, spec: ServerSpec) -> list[str]:
    argv = fake_command(layout, spec)  # the served name stays last
    return [*argv[:-1], "--max-logprobs", str(spec.max_logprobs), argv[-1]]


def test_a_reused_server_with_another_max_logprobs_is_noted(
    layout: Layout, specs: list[ServerSpec]
) -> None:
    start_pair(layout, specs, io.StringIO(), timeout=30, command=_command_with_max_logprobs)
    assert [running_max_logprobs(layout, spec) for spec in specs] == [1024, 1024]
    wide = [replace(spec, max_logprobs=-1) for spec in specs]
    out = io.StringIO()
    again = start_pair(layout, wide, out, timeout=30, command=_command_with_max_logprobs)
    assert again.reused == wide  # reused, not restarted: the note says how to change it
    assert "base: note: it runs with --max-logprobs 1024, not -1; `dual-vllm local stop`" in (
        out.getvalue()
    )
    out = io.StringIO()
    start_pair(layout, specs, out, timeout=30, command=_command_with_max_logprobs)
    assert "note:" not in out.getvalue()


def test_a_port_taken_by_something_else_is_named(layout: Layout, specs: list[ServerSpec]) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", specs[1].port))
        squatter.listen()
        with pytest.raises(LocalVLLMError) as info:
            start_pair(layout, specs, io.StringIO(), timeout=30, command=fake_command)
    message = str(info.value)
    assert f"port {specs[1].port} (127.0.0.1) is already in use" in message
    assert "not a vLLM server" in message
    assert "'smollm2-teacher'" in message


def test_a_port_serving_another_model_is_named(layout: Layout, specs: list[ServerSpec]) -> None:
    teacher = specs[1]
    impostor = ServerSpec("other", teacher.port, "some-other-model", layout.teacher, cpu=1)
    start_pair(layout, [impostor], io.StringIO(), timeout=30, command=fake_command)
    try:
        with pytest.raises(
            LocalVLLMError, match=r"it serves \['some-other-model'\], not 'smollm2-teacher'"
        ):
            start_pair(layout, specs, io.StringIO(), timeout=30, command=fake_command)
    finally:
        stop_specs(layout, [impostor])


def test_a_server_that_dies_at_start_is_reported_with_its_log(
    layout: Layout, specs: list[ServerSpec]
) -> None:
    started = []

    def command(layout_: Layout, spec: ServerSpec) -> list[str]:
        started.append(spec)
        return (dying_command if spec.role == "teacher" else silent_command)(layout_, spec)

    with pytest.raises(LocalVLLMError) as info:
        start_pair(layout, specs, io.StringIO(), timeout=30, command=command)
    message = str(info.value)
    teacher = specs[1]
    assert (
        f"the teacher vLLM server (smollm2-teacher, port {teacher.port}) exited with code 3"
        in message
    )
    assert str(teacher.log_file(layout)) in message
    assert "ValueError: No supported config format found" in message
    # The sibling that was still starting is stopped too: no half pair is left behind.
    base_pid = read_pid(specs[0].pid_file(layout))
    assert base_pid is None or not pid_alive(base_pid)
    assert len(started) == 2


def test_a_server_that_never_gets_healthy_times_out_naming_its_log(
    layout: Layout, specs: list[ServerSpec]
) -> None:
    with pytest.raises(LocalVLLMError) as info:
        start_pair(layout, specs[:1], io.StringIO(), timeout=1.5, command=silent_command)
    assert "not healthy after 2 s" in str(info.value)
    assert str(specs[0].log_file(layout)) in str(info.value)
    assert not specs[0].pid_file(layout).exists()


def test_missing_models_say_to_run_setup(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    specs = default_specs(layout, free_port(), free_port())
    with pytest.raises(LocalVLLMError, match="run `dual-vllm local setup`"):
        start_pair(layout, specs, io.StringIO(), timeout=5, command=fake_command)


def test_logs_of_the_previous_start_are_kept(layout: Layout, specs: list[ServerSpec]) -> None:
    spec = specs[0]
    layout.run.mkdir(parents=True)
    spec.log_file(layout).write_text("previous run\n")
    start_pair(layout, [spec], io.StringIO(), timeout=30, command=fake_command)
    assert spec.log_file(layout).with_name(spec.log_file(layout).name + ".1").read_text() == (
        "previous run\n"
    )


def test_a_server_another_command_is_starting_is_waited_for_but_not_claimed(
    layout: Layout, specs: list[ServerSpec]
) -> None:
    """A pytest session's fixture beside `dual-vllm local start`: the session must not stop,
    at its end, a server the other command launched."""
    spec = specs[0]
    other_pid = launch(layout, spec, slow_command)  # the other command, still starting
    out = io.StringIO()
    result = start_pair(layout, [spec], out, timeout=30, command=fake_command)
    assert f"PID {other_pid} is still starting; waiting for it" in out.getvalue()
    assert result.started == []
    assert result.reused == []
    stop_launched(layout, result.launches)
    assert pid_alive(other_pid)
    assert read_pid(spec.pid_file(layout)) == other_pid


def test_stop_launched_spares_a_server_relaunched_on_the_port_by_another_command(
    layout: Layout, specs: list[ServerSpec]
) -> None:
    spec = specs[0]
    ours = start_pair(layout, [spec], io.StringIO(), timeout=30, command=fake_command)
    stop_specs(layout, [spec])  # another command: `local stop`, then `local start`
    theirs = start_pair(layout, [spec], io.StringIO(), timeout=30, command=fake_command)
    (their_launch,) = theirs.launches
    out = io.StringIO()
    stop_launched(layout, ours.launches, out)
    assert "not running" in out.getvalue()
    assert pid_alive(their_launch.pid)
    assert read_pid(spec.pid_file(layout)) == their_launch.pid


def test_two_commands_starting_at_once_launch_one_server(
    layout: Layout, specs: list[ServerSpec]
) -> None:
    """Without the start lock both find the port free and both launch; the loser's server
    dies on the taken port and its command fails."""
    spec = specs[0]
    second_decided = threading.Event()
    calls: list[str] = []

    def command(layout_: Layout, spec_: ServerSpec) -> list[str]:
        calls.append(threading.current_thread().name)
        if len(calls) == 1:  # the first launcher lingers between its check and its PID file
            second_decided.wait(timeout=1.0)
        else:
            second_decided.set()
        return fake_command(layout_, spec_)

    results: dict[str, StartResult | Exception] = {}

    def start(name: str) -> None:
        try:
            results[name] = start_pair(layout, [spec], io.StringIO(), timeout=30, command=command)
        except Exception as exc:  # reported through `results`, asserted below
            results[name] = exc

    threads = [threading.Thread(target=start, args=(name,), name=name) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(calls) == 1
    outcomes = [results[name] for name in "ab"]
    assert all(isinstance(outcome, StartResult) for outcome in outcomes), outcomes
    started = sorted(
        len(outcome.started) for outcome in outcomes if isinstance(outcome, StartResult)
    )
    assert started == [0, 1]
