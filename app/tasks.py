"""asyncio helpers for fan-out with typed errors: a TaskGroup whose first failure cancels the
siblings and is re-raised as itself (not an ExceptionGroup), so app/errors.py's table sees the
typed upstream error; and a clean cancel of one task."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
U = TypeVar("U")


def _leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception to re-raise from a TaskGroup: the first that is not a cancellation."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    for exc in leaves:
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return leaves[0] if leaves else group


@contextlib.asynccontextmanager
async def task_group() -> AsyncIterator[asyncio.TaskGroup]:
    """An `asyncio.TaskGroup` whose first failure cancels the other tasks and is re-raised as
    itself (not as an ExceptionGroup, so callers and the error table see the typed error)."""
    try:
        async with asyncio.TaskGroup() as group:
            yield group
    except BaseExceptionGroup as exc:
        raise _leaf(exc) from None


async def both(a: Coroutine[Any, Any, T], b: Coroutine[Any, Any, U]) -> tuple[T, U]:
    """Run two calls concurrently (`task_group`: the first failure cancels the other)."""
    async with task_group() as group:
        task_a = group.create_task(a)
        task_b = group.create_task(b)
    return task_a.result(), task_b.result()


async def cancel(*tasks: asyncio.Future[Any]) -> None:
    """Cancel `tasks`, wait for them to end, and retrieve their outcomes (no "never retrieved"
    log)."""
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled():
            task.exception()
