"""How the bridge waits for JetStream's acknowledgements of one flight (no NATS needed: nats-py
hands out plain asyncio futures, and a pending one keeps its place in the client until done)."""

from __future__ import annotations

import asyncio

from coordinator.federation.flights import settled


async def test_each_acknowledgement_comes_back_in_order_and_the_missing_ones_as_timeouts() -> None:
    loop = asyncio.get_running_loop()
    acked, failed, missing = loop.create_future(), loop.create_future(), loop.create_future()
    acked.set_result("ack 1")
    failed.set_exception(ConnectionError("gone"))
    results = await settled([acked, failed, missing], 0.05)
    assert results[0] == "ack 1"
    assert isinstance(results[1], ConnectionError)
    assert isinstance(results[2], TimeoutError)
    assert missing.cancelled()  # its place in the client is given back


async def test_a_wait_torn_down_gives_every_place_back() -> None:
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in range(3)]
    waiting = asyncio.create_task(settled(futures, 60))
    await asyncio.sleep(0)  # the wait has begun
    waiting.cancel()
    try:
        await waiting
    except asyncio.CancelledError:
        pass
    else:
        raise AssertionError("the cancelled wait returned")
    assert all(f.cancelled() for f in futures)


async def test_an_empty_flight_needs_no_wait() -> None:
    assert await settled([], 60) == []
