"""`dual-vllm serve`: the gateway on uvicorn (one worker).

Settings come from the environment (`DUAL_VLLM_*`, README.md) and `--host` / `--port`.
It listens at once (`/health` answers; `/ready` is 503 and generation requests get a 503 until
the upstreams have answered the start-up checks, which are retried while they do not answer).
A bad setting, a wrong upstream (another tokenizer, K above its limit...), an upstream still
not answering after DUAL_VLLM_STARTUP_TIMEOUT or a taken port ends the command with one clear
line on stderr and a non-zero status, not a traceback. SIGTERM drains (app/lifecycle.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable
from types import FrameType

from pydantic import ValidationError
from uvicorn import config as uvicorn_config
from uvicorn import server as uvicorn_server

from app.lifecycle import Lifecycle
from app.settings import Settings

log = logging.getLogger(__name__)

EXIT_SETTINGS = 2
EXIT_STARTUP = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="listen address (default: DUAL_VLLM_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (default: DUAL_VLLM_PORT or 8000)")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level of the gateway and uvicorn (default: info)",
    )


def settings_error(exc: ValidationError) -> str:
    """One line per problem, named by its environment variable."""
    lines = []
    for error in exc.errors():
        loc = error.get("loc") or ("settings",)
        name = f"DUAL_VLLM_{str(loc[0]).upper()}"
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        lines.append(f"  {name}: {message}")
    return "invalid settings:\n" + "\n".join(lines)


def _port_free(host: str, port: int) -> str | None:
    """None if host:port can be bound now, else why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


async def serve(settings: Settings, *, log_level: str = "info") -> None:
    """Run the gateway until SIGINT/SIGTERM. Raises StartupError if it must not serve.

    It listens at once: `/health` answers while the start-up checks wait for the upstreams in
    the background (app/lifecycle.py "starting"); they raise StartupError (which stops the
    server) only for a wrong configuration or after DUAL_VLLM_STARTUP_TIMEOUT. The first
    SIGTERM/SIGINT drains (`Settings.shutdown_grace`), a second one stops at once."""
    import uvicorn

    from app.coordinator import Coordinator
    from app.main import create_app
    from app.metrics import Metrics
    from app.upstream import StartupError

    metrics = Metrics()
    lifecycle = Lifecycle("starting")
    coordinator = Coordinator(settings, observer=metrics)
    app = create_app(settings, coordinator=coordinator, metrics=metrics, lifecycle=lifecycle)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        lifespan="on",
        http="httptools",  # the C HTTP parser: less CPU per request than h11
        # The drain (below) already waited for the requests in flight; this bounds the last
        # writes after it.
        timeout_graceful_shutdown=int(_FLUSH_SECONDS) + 1,
    )
    server = _DrainingServer(config, lifecycle, settings.shutdown_grace)
    failure: list[StartupError] = []

    async def start_upstreams() -> None:
        try:
            await coordinator.start()
        except StartupError as exc:
            failure.append(exc)
            server.should_exit = True
            return
        lifecycle.serving()

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _quiet)
    starting = asyncio.create_task(start_upstreams())
    try:
        await server.serve()
    finally:
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        await coordinator.aclose()
    if failure:
        raise failure[0]


_FLUSH_SECONDS = 5.0


class _DrainingServer(uvicorn_server.Server):
    """uvicorn's server whose first exit signal drains (app/lifecycle.py) before it exits:
    the listener stays open so new requests get a clear 503 while the load balancer notices
    /ready, in-flight requests finish within the grace period, running streams are then cut
    with an error frame. A second signal exits at once."""

    def __init__(self, config: uvicorn_config.Config, lifecycle: Lifecycle, grace: float) -> None:
        super().__init__(config)
        self._lifecycle = lifecycle
        self._grace = grace
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        loop = self._loop
        if self._draining is not None or loop is None or self.should_exit or not self.started:
            super().handle_exit(sig, frame)
            return
        # A signal handler: schedule the drain on the loop, do not run it here.
        loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._draining is None:
            self._draining = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        log.info("shutdown signal: draining (grace %.0fs)", self._grace)
        await self._lifecycle.drain(self._grace, flush=_FLUSH_SECONDS)
        self.should_exit = True


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop (less CPU per socket operation) where it is installed."""
    try:
        import uvloop
    except ImportError:  # not on this platform: asyncio's own loop
        return None
    return uvloop.new_event_loop


def _quiet(signum: int, frame: FrameType | None) -> None:
    """Uvicorn re-raises the signal that stopped it once it is done; by then the gateway is
    shutting down on purpose, so the re-raised signal must not kill it before the upstream
    clients are closed."""


def run(args: argparse.Namespace) -> int:
    from app.upstream import StartupError

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # httpx logs every request at INFO: two upstream calls per generated token would drown the
    # gateway's own log. Its warnings still show; --log-level debug shows everything.
    if args.log_level.lower() != "debug":
        logging.getLogger("httpx").setLevel(logging.WARNING)
    overrides: dict[str, object] = {}
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        sys.stderr.write(f"dual-vllm serve: {settings_error(exc)}\n")
        return EXIT_SETTINGS
    problem = _port_free(settings.host, settings.port)
    if problem is not None:
        sys.stderr.write(
            f"dual-vllm serve: cannot listen on {settings.host}:{settings.port}: {problem} "
            "(choose another with --port or DUAL_VLLM_PORT)\n"
        )
        return EXIT_STARTUP
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve(settings, log_level=args.log_level))
    except StartupError as exc:
        sys.stderr.write(f"dual-vllm serve: refusing to start: {exc}\n")
        return EXIT_STARTUP
    except KeyboardInterrupt:  # Ctrl-C during the start-up checks
        return 130
    return 0
