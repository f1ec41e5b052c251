"""The gateway's life: starting -> serving -> draining (docs/OPERATIONS.md "Start-up and
shutdown").

- **starting**: `dual-vllm serve` listens at once (`/health` answers) while the start-up checks
  wait for the upstreams (app/pair.py); `/ready` is 503 and generation requests get a 503
  saying the gateway is starting.
- **serving**: the checks passed.
- **draining**: SIGTERM arrived (app/server.py). New generation requests get a 503, `/ready` is
  503, requests in flight may finish within `Settings.shutdown_grace` seconds; at that deadline
  `cut` is set and every stream still running ends with an error frame and `[DONE]`
  (`cut_frames`, through app/streaming.py's `with_keepalive`).

`Lifecycle` also counts the generation requests in flight (app/main.py's admission middleware
enters and leaves it), so the drain knows when the last one has finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Literal

from app.errors import GATEWAY_DRAINING, GATEWAY_STARTING, ErrorKind, error_body
from app.streaming import DONE, frame

log = logging.getLogger(__name__)

State = Literal["starting", "serving", "draining"]

CUT_MESSAGE = (
    "the gateway is shutting down and this stream outlived its shutdown grace period; "
    "retry the request"
)


class Lifecycle:
    def __init__(self, state: State = "serving") -> None:
        self.state: State = state
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.cut = asyncio.Event()  # set at the drain deadline: running streams end now

    def serving(self) -> None:
        if self.state == "starting":
            self.state = "serving"
            log.info("the upstreams answered: serving")

    def refusal(self) -> tuple[str, ErrorKind] | None:
        """Why a new generation request is refused now (503), or None."""
        if self.state == "starting":
            return (
                "the gateway is starting: its upstream vLLM servers have not answered yet; "
                "retry later",
                GATEWAY_STARTING,
            )
        if self.state == "draining":
            return "the gateway is shutting down; retry on another instance", GATEWAY_DRAINING
        return None

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight <= 0:
            self.in_flight = 0
            self._idle.set()

    async def drain(self, grace: float, *, flush: float = 5.0) -> bool:
        """Stop admitting, wait up to `grace` seconds for the requests in flight, then cut the
        streams still running and wait up to `flush` seconds for them to send their last
        frames. True when every request finished within the grace period."""
        self.state = "draining"
        log.info("draining: %d request(s) in flight, grace %.0fs", self.in_flight, grace)
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
            return True
        except TimeoutError:
            log.warning(
                "shutdown grace period over: cutting %d request(s) still in flight",
                self.in_flight,
            )
        self.cut.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), flush)
        return False


def cut_frames(set_outcome: Callable[[str], None]) -> list[bytes]:
    """The end of a stream cut at the drain deadline (`streaming.with_keepalive`'s `on_cut`):
    outcome "cancelled", an error frame, `[DONE]`."""
    set_outcome("cancelled")
    return [frame(error_body(CUT_MESSAGE, GATEWAY_DRAINING)), DONE]
