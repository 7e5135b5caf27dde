"""asyncio helpers the layers share."""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["reap"]


async def reap(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait until it has ended, whatever it ends with. A cancel of the
    caller meanwhile goes on (``suppress(CancelledError)`` around the await would take the
    caller's own cancel for the task's, and the caller would carry on as if not cancelled)."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
    except Exception:
        pass  # how the task failed no longer matters: it was being stopped
