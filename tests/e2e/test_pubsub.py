"""Publish/subscribe through a real `celery -A workers worker`: patterns, unsubscribe, fan-out."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
import redis

from coordinator.keys import Keys
from tests.e2e.helpers import Peer, Recorder, start_worker
from tests.support import Processes, async_wait_for, sidecar_env


@pytest.fixture
def worker(procs: Processes, redis_url: str, namespace: str, client: redis.Redis) -> None:
    start_worker(procs, sidecar_env(redis_url, namespace, router_lease=1.0), client, "w1")


@contextlib.asynccontextmanager
async def peers(n: int, namespace: str, redis_url: str) -> AsyncIterator[list[Peer]]:
    """``n`` peers set up through the worker, torn down (leaving the cluster) afterwards."""
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(Peer(namespace=namespace, redis_url=redis_url))
               for _ in range(n)]


@pytest.mark.usefixtures("worker")
async def test_exact_star_and_full_wildcard_patterns(namespace: str, redis_url: str) -> None:
    async with peers(2, namespace, redis_url) as (sub, pub):
        exact, star, full, other = Recorder(), Recorder(), Recorder(), Recorder()
        await sub.cluster_subscribe("orders.created", exact)
        await sub.cluster_subscribe("orders.*", star)
        await sub.cluster_subscribe("orders.>", full)
        await sub.cluster_subscribe("marker", other)

        await pub.cluster_publish("orders.created", {"n": 1})     # exact, '*' and '>'
        await pub.cluster_publish("orders.eu.created", {"n": 2})  # only '>' (two tokens after)
        await pub.cluster_publish("orders", {"n": 3})             # none: '>' needs one more token
        await pub.cluster_publish("invoices.created", {"n": 4})   # none
        await pub.cluster_publish("orders.shipped", {"n": 5})     # '*' and '>'
        await pub.cluster_publish("marker", {"n": 6})
        # Everything reaches one inbox in publish order, so once the marker is in, so is the rest.
        await other.wait_for_count(1)

        assert exact.data == [{"n": 1}]
        assert star.data == [{"n": 1}, {"n": 5}]
        assert full.data == [{"n": 1}, {"n": 2}, {"n": 5}]
        assert other.data == [{"n": 6}]
        first = full.messages[0]
        assert (first.topic, first.sender) == ("orders.created", pub.id)
        assert first.timestamp > 0
        # one message matching three patterns is one message: the same id reached every handler
        assert exact.messages[0].id == star.messages[0].id == first.id
        assert sub.status["peer"]["cluster_subscriptions"] == 4


@pytest.mark.usefixtures("worker")
async def test_unsubscribe_stops_delivery(namespace: str, redis_url: str) -> None:
    async with peers(2, namespace, redis_url) as (sub, pub):
        star, full = Recorder(), Recorder()
        await sub.cluster_subscribe("news.*", star)
        await sub.cluster_subscribe("news.>", full)
        await pub.cluster_publish("news.a", {"before": 1})
        await star.wait_for_count(1)
        await full.wait_for_count(1)

        await sub.cluster_unsubscribe("news.*")  # returns once the router applied it
        for i in range(5):
            await pub.cluster_publish("news.b", {"after": i})
        await pub.cluster_publish("news.marker.end", {"marker": True})
        # 'news.>' still matches the marker; per-publisher FIFO into the one inbox means the five
        # publishes before it would already have reached 'news.*' had it still been subscribed.
        await full.wait_for_data({"marker": True})

        assert star.data == [{"before": 1}]
        assert full.data == [{"before": 1}, *({"after": i} for i in range(5)), {"marker": True}]
        assert sub.status["peer"]["cluster_subscriptions"] == 1


@pytest.mark.usefixtures("worker")
async def test_several_handlers_share_a_pattern_and_unsubscribe_drops_all(
        namespace: str, redis_url: str) -> None:
    async with peers(2, namespace, redis_url) as (sub, pub):
        first, second, marker = Recorder(), Recorder(), Recorder()
        await sub.cluster_subscribe("jobs.done", first)
        await sub.cluster_subscribe("jobs.done", second)
        await sub.cluster_subscribe("jobs.marker", marker)
        await pub.cluster_publish("jobs.done", {"job": 1})
        await second.wait_for_count(1)
        assert first.data == second.data == [{"job": 1}]

        await sub.cluster_unsubscribe("jobs.done")
        await pub.cluster_publish("jobs.done", {"job": 2})
        await pub.cluster_publish("jobs.marker", {})
        await marker.wait_for_count(1)
        assert first.data == second.data == [{"job": 1}]


@pytest.mark.usefixtures("worker")
async def test_five_peers_all_receive_every_message_in_order(
        namespace: str, redis_url: str, client: redis.Redis) -> None:
    async with peers(6, namespace, redis_url) as everyone:
        pub, subs = everyone[0], everyone[1:]
        recorders = [Recorder() for _ in subs]
        for peer, rec in zip(subs, recorders, strict=True):
            await peer.cluster_subscribe("fanout.>", rec)
        for i in range(50):
            await pub.cluster_publish(f"fanout.k{i % 3}", {"i": i})
        for rec in recorders:
            await rec.wait_for_count(50)

        expected = [{"i": i} for i in range(50)]
        for rec in recorders:
            assert rec.data == expected
            assert {m.sender for m in rec.messages} == {pub.id}
        # the same message ids reached all five inboxes
        assert len({tuple(m.id for m in rec.messages) for rec in recorders}) == 1
        # the router writes its counters at each lease renewal, off the hot path
        stats = await async_wait_for(lambda: (lambda s: s if int(s.get("delivered", 0)) >= 250 else None)(
            client.hgetall(Keys(namespace).stats)), what="the router's counters")
        assert int(stats["routed"]) >= 50 and int(stats["delivered"]) >= 250


@pytest.mark.usefixtures("worker")
async def test_publisher_subscribed_to_its_own_topic_hears_itself_once(
        namespace: str, redis_url: str) -> None:
    async with peers(1, namespace, redis_url) as (solo,):
        rec = Recorder()
        await solo.cluster_subscribe("echo.>", rec)
        await solo.cluster_subscribe("echo.*", rec)  # same handler, two matching patterns
        await solo.cluster_publish("echo.x", "hello")
        await rec.wait_for_count(2)
        assert rec.data == ["hello", "hello"]  # once per pattern, one message id
        assert len({m.id for m in rec.messages}) == 1
