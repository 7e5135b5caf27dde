"""Federation under faults: NATS restarted, a site's Redis stopped, NATS unreachable for long.

Every test has its own NATS server (and, where a Redis is stopped, its own Redis).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from contextlib import AsyncExitStack

import pytest
import redis

from coordinator import Keys
from mixin import Message
from ops.embedded import NatsServer, RedisServer
from tests.integration.test_federation import peers, running_sites, site
from tests.support import async_wait_for


@pytest.fixture
def nats_of_test() -> Iterator[NatsServer]:
    server = NatsServer().start()
    try:
        yield server
    finally:
        server.stop()


class Stream:
    """Records a numbered stream on one site: handler calls in order."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def __call__(self, message: Message) -> None:
        self.seen.append(message.data)

    def exactly(self, n: int) -> bool:
        return len(self.seen) >= n

    def check(self, expected: list[int]) -> None:
        assert len(self.seen) == len(set(self.seen)), "a handler ran twice for one message"
        assert self.seen == expected, f"missing or out of order: {sorted(set(expected) - set(self.seen))[:5]}"


async def test_nats_restarted_mid_stream_loses_nothing(redis_server: RedisServer,
                                                       second_redis: RedisServer,
                                                       nats_of_test: NatsServer, namespace: str) -> None:
    a = site(redis_server.url, nats_of_test.url, namespace, "a")
    b = site(second_redis.url, nats_of_test.url, namespace, "b")
    far, near = Stream(), Stream()
    async with running_sites(a, b) as sidecars, AsyncExitStack() as stack:
        pa, pb = await peers(stack, a, b)
        await pb.cluster_subscribe("n.*", far)
        await pa.cluster_subscribe("n.*", near)
        for i in range(200):
            await pa.cluster_publish("n.x", i)
        await async_wait_for(lambda: far.exactly(100), what="half the stream across")
        nats_of_test.stop()
        for i in range(200, 400):  # NATS is down: local routing goes on
            await pa.cluster_publish("n.x", i)
        await async_wait_for(lambda: near.exactly(400), what="local deliveries while NATS is down")
        nats_of_test.start()
        for i in range(400, 500):
            await pa.cluster_publish("n.x", i)
        await async_wait_for(lambda: far.exactly(500), timeout=30, what="the rest across")
        await asyncio.sleep(0.3)
        assert all(sc.bridge and sc.bridge.bridge.export_failed == 0 for sc in sidecars)
    near.check(list(range(500)))
    far.check(list(range(500)))


async def test_a_stopped_site_catches_up_while_the_other_routes_on(
        redis_server: RedisServer, fresh_redis: RedisServer, nats_server: NatsServer,
        namespace: str) -> None:
    a = site(redis_server.url, nats_server.url, namespace, "a")
    b = site(fresh_redis.url, nats_server.url, namespace, "b")
    far, near = Stream(), Stream()
    assert fresh_redis.process is not None
    pid = fresh_redis.process.pid
    async with running_sites(a, b), AsyncExitStack() as stack:
        pa, pb = await peers(stack, a, b)
        await pb.cluster_subscribe("s.*", far)
        await pa.cluster_subscribe("s.*", near)
        for i in range(100):
            await pa.cluster_publish("s.x", i)
        await async_wait_for(lambda: far.exactly(100), what="the first hundred across")
        os.kill(pid, signal.SIGSTOP)  # site B's Redis stops answering
        try:
            for i in range(100, 600):
                await pa.cluster_publish("s.x", i)
            await async_wait_for(lambda: near.exactly(600), what="site A routing on its own")
            assert len(far.seen) == 100
        finally:
            os.kill(pid, signal.SIGCONT)
        await async_wait_for(lambda: far.exactly(600), timeout=30, what="site B catching up")
        await asyncio.sleep(0.3)
    near.check(list(range(600)))
    far.check(list(range(600)))


async def test_exports_wait_while_nats_is_away_bounded_then_flow_again(
        redis_server: RedisServer, second_redis: RedisServer, nats_of_test: NatsServer,
        namespace: str) -> None:
    a = site(redis_server.url, nats_of_test.url, namespace, "a", bridge_backlog=50)
    b = site(second_redis.url, nats_of_test.url, namespace, "b")
    far, near = Stream(), Stream()
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    keys = Keys(namespace)
    try:
        async with running_sites(a, b) as sidecars, AsyncExitStack() as stack:
            pa, pb = await peers(stack, a, b)
            await pb.cluster_subscribe("u.*", far)
            await pa.cluster_subscribe("u.*", near)
            await pa.cluster_publish("u.x", -1)
            await async_wait_for(lambda: far.exactly(1), what="the first message across")
            nats_of_test.stop()
            for i in range(30):  # within the bound: these wait, and go once NATS is back
                await pa.cluster_publish("u.x", i)
            await async_wait_for(lambda: near.exactly(31), what="local deliveries")
            await asyncio.sleep(1)
            assert len(far.seen) == 1
            nats_of_test.start()
            await async_wait_for(lambda: far.exactly(31), timeout=30, what="the waiting thirty")
            nats_of_test.stop()
            for i in range(30, 200):  # past the bound: the oldest waiting are given up
                await pa.cluster_publish("u.x", i)
            bridge = sidecars[0].bridge
            assert bridge is not None
            await async_wait_for(lambda: bridge.bridge.export_failed > 0, timeout=30,
                                 what="exports given up past the bound")
            nats_of_test.start()
            for i in range(200, 210):
                await pa.cluster_publish("u.x", i)
            await async_wait_for(lambda: 209 in far.seen, timeout=30, what="flow after NATS is back")
            await asyncio.sleep(0.3)
            given_up = [int(f["raw"]) for _, f in client.xrange(keys.deadletter)
                        if f["reason"] == "export_failed"]
    finally:
        client.close()
    near.check([-1, *range(210)])
    assert len(given_up) == bridge.bridge.export_failed
    arrived = far.seen[1:]
    assert len(arrived) == len(set(arrived)) and not set(arrived) & set(given_up)
    assert sorted(arrived + given_up) == list(range(210))  # each message arrived or was given up
    assert arrived == sorted(arrived)  # in order
    assert set(range(30)) | set(range(200, 210)) <= set(arrived)
