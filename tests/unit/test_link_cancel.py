"""A peer's control request never swallows the cancellation of the task awaiting it.

Python 3.11's ``asyncio.wait_for`` returns the result, and drops a cancel, when the awaited future
completes in the same turn of the loop as the task is cancelled. A SIGTERM whose cancel met the
reply of a ``subscribe`` was lost that way: the peer stayed in the cluster and its process kept
running (seen once in CI as ``test_a_stopped_peer_process_leaves_at_once``).
"""

from __future__ import annotations

import asyncio

import pytest

from coordinator.settings import Settings
from mixin.link import SidecarLink


async def _nothing(eid: str, fields: dict[str, str]) -> bool:
    return True


async def test_a_cancel_that_meets_the_reply_is_not_lost() -> None:
    # no Redis is reached: the link connects lazily, and the write is replaced below
    link = SidecarLink("p1", Settings(redis_url="redis://127.0.0.1:1/0", namespace="cancel"),
                       on_entry=_nothing)
    task: asyncio.Task[dict[str, str]] | None = None

    def reply_and_cancel(rid: str) -> None:
        link._replies[rid].set_result({"ok": "1"})  # the router's reply lands...
        assert task is not None
        task.cancel()  # ...in the same turn as the signal's cancel

    async def write(entry: dict[str, str]) -> None:
        asyncio.get_running_loop().call_soon(reply_and_cancel, entry["r"])

    link.write = write  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(link.request("sub", t="x"))
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not link._replies  # nothing left waiting
    await link.redis.aclose()
