"""The replicas of one upstream model as a pool (docs/OPERATIONS.md).

A sequence prefers the replica its affinity key picks (`urls[affinity % n]`, so its prefix cache
stays warm), but that is a preference, not a pin: a replica whose call fails (anything but a
4xx) is ejected for `Settings.replica_eject_seconds`, doubling per consecutive failure up to
`replica_eject_max_seconds`, and taken back once its `/health` answers 200. Calls go to the next
healthy replica meanwhile, and a retry prefers another replica than the one that failed. When
every replica is ejected, the preferred one is used anyway (a call is never refused here).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from app.settings import Settings

log = logging.getLogger(__name__)


def redact_url(url: str) -> str:
    """`url` with its password (or a lone user-info token) replaced by `***`, for logs:
    `http://user:secret@host` -> `http://user:***@host`, `http://token@host` -> `http://***@host`."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, tail = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    masked = f"{user}:***" if colon else "***"
    return f"{scheme}://{masked}@{host}{slash}{tail}"


class ReplicaPool:
    """The healthy and ejected replicas of one upstream (`name`: "base" or "teacher")."""

    def __init__(
        self,
        name: str,
        urls: Sequence[str],
        settings: Settings,
        check: Callable[[str], Awaitable[bool]],
        *,
        observer: Any = None,
    ) -> None:
        self.name = name
        self.urls = list(urls)
        self._settings = settings
        self._check = check  # one /health call of a replica
        self._observer = observer
        self._ejected: dict[str, float] = {}  # replica URL -> when its ejection ends
        self._failures: dict[str, int] = {}  # replica URL -> consecutive failures
        self._tasks: set[asyncio.Task[None]] = set()

    async def aclose(self) -> None:
        tasks, self._tasks = list(self._tasks), set()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def answered(self, url: str) -> None:
        """`url` answered a health check: back in the pool if it was out."""
        if url in self._ejected:
            self._reinstate(url)

    def choose(self, affinity: int = 0) -> str:
        """The replica for an affinity key: `urls[affinity % n]` (one sequence's prefix cache
        stays warm) unless it is ejected, then the next healthy one; when every replica is
        ejected, the preferred one (a call is never refused here)."""
        n = len(self.urls)
        first = affinity % n
        if not self._ejected:
            return self.urls[first]
        for offset in range(n):
            url = self.urls[(first + offset) % n]
            if url not in self._ejected:
                return url
        return self.urls[first]

    def healthy(self) -> list[str]:
        """The replicas not ejected now."""
        return [url for url in self.urls if url not in self._ejected]

    def next(self, url: str) -> str:
        """Another replica than `url` for a retry: the next healthy one, else the next one."""
        n = len(self.urls)
        if n == 1:
            return url
        at = self.urls.index(url) if url in self.urls else 0
        others = [self.urls[(at + i) % n] for i in range(1, n)]
        return next((u for u in others if u not in self._ejected), others[0])

    def succeeded(self, url: str) -> None:
        if self._failures.pop(url, None) is not None and url in self._ejected:
            self._reinstate(url)

    def failed(self, url: str, reason: str) -> None:
        """A retryable failure of `url`: eject it (backoff doubling per consecutive failure)
        and probe it back in through /health."""
        if url not in self.urls:
            return
        failures = self._failures[url] = self._failures.get(url, 0) + 1
        if url in self._ejected:
            return
        s = self._settings
        backoff = min(s.replica_eject_seconds * 2 ** (failures - 1), s.replica_eject_max_seconds)
        self._ejected[url] = time.monotonic() + backoff
        log.warning(
            "%s replica %s ejected for %.1fs after a failure (%s)",
            self.name,
            redact_url(url),
            backoff,
            reason,
        )
        if self._observer is not None:
            hook = getattr(self._observer, "replica_ejected", None)
            if hook is not None:
                hook(self.name)
        task = asyncio.get_running_loop().create_task(self._probe_back(url))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _reinstate(self, url: str) -> None:
        self._ejected.pop(url, None)
        self._failures.pop(url, None)
        log.info("%s replica %s is back in the pool", self.name, redact_url(url))

    async def _probe_back(self, url: str) -> None:
        """Wait out the ejection, then take the replica back when /health answers 200; each
        failed check doubles the wait (bounded)."""
        s = self._settings
        while url in self._ejected:
            await asyncio.sleep(max(self._ejected[url] - time.monotonic(), 0.0))
            if url not in self._ejected:
                return
            if await self._check(url):
                self._reinstate(url)
                return
            failures = self._failures[url] = self._failures.get(url, 0) + 1
            backoff = min(
                s.replica_eject_seconds * 2 ** (failures - 1), s.replica_eject_max_seconds
            )
            self._ejected[url] = time.monotonic() + backoff
