"""What a peer application is told at the call, not later in a log line: a Redis it cannot reach
(SidecarUnavailable, saying what to fix) and a payload over the limit (PayloadTooLarge, with nothing
sent), on the routed and the direct data path, for publishes, requests and answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis

from coordinator.errors import PayloadTooLarge, RemoteError, SidecarUnavailable
from coordinator.keys import Keys
from coordinator.settings import Settings
from coordinator.sidecar import ClusterSidecar
from mixin import Message
from ops.embedded import free_port
from tests.support import Peer, async_wait_for

LIMIT = 100


def closed_port_url() -> str:
    return f"redis://:hunter2@127.0.0.1:{free_port()}/0"


@pytest.mark.parametrize("enter", ["async with", "setup()"])
async def test_a_peer_whose_redis_is_unreachable_is_told_so_and_what_to_fix(
        namespace: str, enter: str) -> None:
    peer = Peer(namespace=namespace, redis_url=closed_port_url())
    with pytest.raises(SidecarUnavailable) as caught:
        if enter == "async with":
            async with peer:
                pytest.fail("the peer entered without a Redis")
        else:
            await peer.setup()
    text = str(caught.value)
    assert "cannot reach the sidecar's Redis at redis://:***@127.0.0.1:" in text
    assert "SIDECAR_REDIS_URL" in text and "redis_url=" in text
    assert "hunter2" not in text  # the password stays out of the message
    assert isinstance(caught.value, ConnectionError)  # what `except ConnectionError` expects
    assert not peer.sidecar_connected and peer._link is None  # nothing left open


@pytest.fixture(params=["direct", "routed"])
async def limited(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[Settings]:
    """A router on either data path, and the settings of peers whose own limit is LIMIT bytes."""
    sc = ClusterSidecar(settings=settings.replace(data_path=request.param), run_duties=False)
    await sc.setup()
    try:
        yield settings.replace(max_payload_bytes=LIMIT)
    finally:
        await sc.teardown()


def request_entries(client: redis.Redis, settings: Settings) -> int:
    """Entries in every request stream of the namespace."""
    keys = Keys(settings.namespace)
    return sum(int(client.xlen(keys.requests(p))) for p in range(settings.partitions))


async def test_a_publish_over_the_limit_raises_at_the_call_and_sends_nothing(
        limited: Settings, client: redis.Redis) -> None:
    keys = Keys(limited.namespace)
    async with Peer(settings=limited) as pub, Peer(settings=limited) as sub:
        got: list[Any] = []
        await sub.cluster_subscribe("big.>", lambda m: got.append(m.data))
        before = request_entries(client, limited)
        with pytest.raises(PayloadTooLarge, match=f"{LIMIT}-byte limit.*SIDECAR_MAX_PAYLOAD_BYTES"):
            await pub.cluster_publish("big.x", "x" * LIMIT)
        # characters are not bytes: 60 of these are 122 bytes of JSON
        with pytest.raises(PayloadTooLarge, match="122 bytes"):
            await pub.cluster_publish("big.x", "é" * 60)
        assert request_entries(client, limited) == before
        await pub.cluster_publish("big.x", "small")
        await async_wait_for(lambda: got == ["small"], what="the publish that fits")
    assert not client.exists(keys.deadletter)  # refused at the call: nothing for the router to refuse


async def test_publishes_in_flight_together_refuse_only_the_one_over_the_limit(
        limited: Settings) -> None:
    async with Peer(settings=limited) as pub, Peer(settings=limited) as sub:
        got: list[Any] = []
        await sub.cluster_subscribe("q.>", lambda m: got.append(m.data))
        # gathered: the first goes out alone, the rest wait and are folded into one batch
        results = await asyncio.gather(*(pub.cluster_publish("q.x", i) for i in range(5)),
                                       pub.cluster_publish("q.x", "x" * LIMIT),
                                       *(pub.cluster_publish("q.x", i) for i in range(5, 10)),
                                       return_exceptions=True)
        assert isinstance(results[5], PayloadTooLarge)
        assert not any(isinstance(r, BaseException) for r in results[:5] + results[6:]), results
        await async_wait_for(lambda: got == list(range(10)), what="every publish that fits, in order")


async def test_the_routers_smaller_limit_is_the_one_a_peer_goes_by(settings: Settings) -> None:
    sc = ClusterSidecar(settings=settings.replace(data_path="routed", max_payload_bytes=LIMIT),
                        run_duties=False)
    await sc.setup()
    try:
        async with Peer(settings=settings) as pub:  # its own limit is the default, 1 MiB
            with pytest.raises(PayloadTooLarge, match=f"{LIMIT}-byte limit"):
                await pub.cluster_publish("big.x", "x" * LIMIT)
            with pytest.raises(PayloadTooLarge):
                await pub.cluster_request("big.x", "x" * LIMIT, timeout=5)
    finally:
        await sc.teardown()


async def test_a_request_or_an_answer_over_the_limit_fails_at_once(limited: Settings) -> None:
    async with Peer(settings=limited) as asker, Peer(settings=limited) as answerer:
        explicit: list[BaseException] = []

        async def answer_by_hand(m: Message) -> None:
            try:
                await m.respond("y" * LIMIT)
            except PayloadTooLarge as exc:
                explicit.append(exc)
                raise

        await answerer.cluster_subscribe("svc.big", lambda m: "y" * LIMIT)
        await answerer.cluster_subscribe("svc.by_hand", answer_by_hand)
        await answerer.cluster_subscribe("svc.echo", lambda m: m.data)
        with pytest.raises(PayloadTooLarge):
            await asker.cluster_request("svc.echo", "x" * LIMIT, timeout=5)
        # the answer cannot travel: the requester hears why at once, not a timeout 60 s on
        with pytest.raises(RemoteError, match="PayloadTooLarge: answer of"):
            await asker.cluster_request("svc.big", None, timeout=60)
        with pytest.raises(RemoteError, match="PayloadTooLarge: answer of"):
            await asker.cluster_request("svc.by_hand", None, timeout=60)
        assert len(explicit) == 1  # message.respond raised in the handler, at the call
        assert await asker.cluster_request("svc.echo", "fits", timeout=5) == "fits"
