"""Stopping a task never swallows the cancel of whoever stops it (coordinator.aio.reap)."""

from __future__ import annotations

import asyncio

import pytest

from coordinator.aio import reap
from coordinator.federation.bridge import Bridge
from coordinator.settings import Settings


async def _slow_to_stop(stopped: list[str]) -> None:
    """Runs until cancelled, then takes a while to clean up."""
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        await asyncio.sleep(0.05)
        stopped.append("cleaned up")
        raise


async def test_reap_waits_until_the_task_has_ended() -> None:
    stopped: list[str] = []
    task = asyncio.create_task(_slow_to_stop(stopped))
    await asyncio.sleep(0)
    await reap(task)
    assert task.cancelled() and stopped == ["cleaned up"]


async def test_a_failing_task_is_reaped_quietly() -> None:
    async def fails() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            raise RuntimeError("failed while stopping")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    await reap(task)
    assert task.done()


async def test_a_cancel_of_the_caller_goes_on() -> None:
    task = asyncio.create_task(_slow_to_stop([]))
    await asyncio.sleep(0)
    caller = asyncio.create_task(reap(task))
    await asyncio.sleep(0.01)  # the caller waits for the task's clean-up
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller


async def test_a_bridge_stopping_its_work_is_still_cancellable() -> None:
    # (no server is reached: the clients connect lazily)
    bridge = Bridge(Settings(redis_url="redis://127.0.0.1:1/0", nats_url="nats://127.0.0.1:1",
                             namespace="reap"), name="b1")
    bridge._work = asyncio.create_task(_slow_to_stop([]))
    await asyncio.sleep(0)
    stopping = asyncio.create_task(bridge._deactivate("test"))
    await asyncio.sleep(0.01)
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    await bridge.redis.aclose()
