"""asyncio helpers the layers share."""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["reap"]


async def reap(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait until it has ended, whatever it ends with.

    A cancel of the caller that comes while it waits goes on once the task has ended (however
    the task ends: ``suppress(CancelledError)`` around the await would take the caller's cancel
    for the task's, and the caller would carry on as if not cancelled). A cancel the caller was
    already handling when it called this (a ``finally`` on the way out) is left to the caller,
    so the clean-up after this call still runs."""
    current = asyncio.current_task()
    before = current.cancelling() if current is not None else 0
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass  # how the task ended no longer matters: it was being stopped
    if current is not None and current.cancelling() > before:
        raise asyncio.CancelledError
