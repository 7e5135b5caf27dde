"""Stopping a task never swallows the cancel of whoever stops it (coordinator.aio.reap)."""

from __future__ import annotations

import asyncio

import pytest

from coordinator.aio import reap
from coordinator.federation.bridge import Bridge
from coordinator.federation.governor import Governor
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


async def test_a_cancel_of_the_caller_goes_on_however_the_task_ends() -> None:
    async def fails_while_stopping() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            try:
                await asyncio.sleep(0.05)
            finally:
                raise RuntimeError("broke while stopping")

    task = asyncio.create_task(fails_while_stopping())
    await asyncio.sleep(0)
    caller = asyncio.create_task(reap(task))
    await asyncio.sleep(0.01)  # the caller waits for the task's clean-up
    caller.cancel()  # the task then ends with its own error, not cancelled
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert isinstance(task.exception(), RuntimeError)


async def test_a_caller_already_stopping_still_runs_its_clean_up() -> None:
    cleaned: list[str] = []

    async def owner() -> None:
        work = asyncio.create_task(_slow_to_stop(cleaned))
        try:
            await asyncio.sleep(60)
        finally:  # on the way out of a cancel: reaping must not cut what follows short
            await reap(work)
            cleaned.append("owner")

    task = asyncio.create_task(owner())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == ["cleaned up", "owner"]


async def test_a_cancelled_bridge_still_stops_its_work_and_cleans_up() -> None:
    bridge = Bridge(Settings(redis_url="redis://127.0.0.1:1/0", nats_url="nats://127.0.0.1:1",
                             namespace="reap"), name="b2")
    stopped: list[str] = []
    bridge._work = asyncio.create_task(_slow_to_stop(stopped))
    running = asyncio.create_task(bridge.run(asyncio.Event()))
    await asyncio.sleep(0.05)  # (its ticks fail: nothing listens on port 1)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert stopped == ["cleaned up"] and bridge._work is None and not bridge.active


async def test_a_bridge_cancelled_while_a_round_fails_does_not_start_over() -> None:
    # Python 3.11: a task group whose child fails with an ordinary error while the group is being
    # cancelled raises that error alone; the bridge must still end on the cancel
    bridge = Bridge(Settings(redis_url="redis://127.0.0.1:1/0", nats_url="nats://127.0.0.1:1",
                             namespace="reap"), name="b3")
    bridge._governor = Governor(bridge.settings, site="s", name="b3", token=bridge.token,
                                redis=bridge.redis, scripts=bridge.scripts)
    rounds: list[int] = []

    async def connect() -> None:
        rounds.append(1)

    async def round_failing_on_cancel() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            if len(rounds) == 1:  # (a second round, should there be one, ends as cancelled)
                raise ExceptionGroup("round", [RuntimeError("a child failed meanwhile")]) from None
            raise

    bridge._connect = connect  # type: ignore[method-assign]
    bridge._round = round_failing_on_cancel  # type: ignore[method-assign]
    federating = asyncio.create_task(bridge._federate())
    await asyncio.sleep(0.01)
    federating.cancel()
    done, _ = await asyncio.wait({federating}, timeout=2)
    if not done:  # it started over: stop the second round, then fail
        federating.cancel()
        await asyncio.wait({federating})
    assert rounds == [1], "the bridge started over instead of ending on the cancel"
    assert federating.cancelled()
    await bridge.redis.aclose()
