"""Every publish that returned is handled exactly once, in order, however the connection is cut.

A proxy sits between the publishing peer and Redis and cuts its connection after a publish ran but
before its reply came back (the publisher sends it again), or before the publish reached Redis: on
the direct data path the publish is a ``publish.lua`` call (EVALSHA), through the router an XADD.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import redis

from coordinator.keys import Keys
from coordinator.policy.auth import Identities
from coordinator.scripts import scripts_for
from coordinator.settings import Settings
from coordinator.sidecar import ClusterSidecar
from mixin import Message
from ops.embedded import RedisServer
from tests.faultproxy import FaultProxy
from tests.support import TEST_PEER_KEY, Peer, async_wait_for


@pytest.fixture
def proxy(redis_server: RedisServer) -> Iterator[FaultProxy]:
    p = FaultProxy(redis_server.port)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture(params=["direct", "routed", "signed"])
def settings(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    """The test's settings in each mode (the shared ``sidecar`` fixture runs on them too)."""
    if request.param == "signed":
        return settings.replace(auth="required", peer_key=TEST_PEER_KEY)
    return settings.replace(data_path=request.param)


def peer(st: Settings, client: redis.Redis, name: str) -> Peer:
    """A peer of ``st``; in signed mode with an identity of its own."""
    if st.auth != "required":
        return Peer(settings=st)
    creds = Identities(client, Keys(st.namespace), TEST_PEER_KEY).add(name, ["peer"])
    return Peer(namespace=st.namespace, id=creds["SIDECAR_PEER_ID"], settings=st,
                secret=creds["SIDECAR_PEER_SECRET"])


@pytest.mark.parametrize("cut", ["after", "before"])
@pytest.mark.parametrize("folded", [False, True], ids=["one-by-one", "folded"])
async def test_publishes_survive_cut_connections_exactly_once_in_order(
        settings: Settings, sidecar: ClusterSidecar, proxy: FaultProxy, client: redis.Redis,
        cut: str, folded: bool) -> None:
    mode = settings
    through_proxy = mode.replace(redis_url=proxy.url)
    got: list[Message] = []
    async with peer(through_proxy, client, "pub") as pub, peer(mode, client, "sub") as sub:
        await sub.cluster_subscribe("cut.>", got.append)
        arm = proxy.cut_after_command if cut == "after" else proxy.cut_before_command
        path = pub._require_link().data_path
        assert path == ("direct" if mode.data_path == "direct" and mode.auth == "off" else "routed")
        n = 0
        for _round in range(6):
            arm(scripts_for(client).publish.sha.encode() if path == "direct" else b"XADD")
            if folded:  # several in flight at once: they fold into pubs entries
                await asyncio.gather(*(pub.cluster_publish("cut.x", {"n": n + i}) for i in range(20)))
                n += 20
            else:
                for _ in range(10):
                    await pub.cluster_publish("cut.x", {"n": n})
                    n += 1
        assert proxy.cuts == 6 and proxy.armed == 0
        await pub.cluster_publish("cut.end", {"n": n})
        await async_wait_for(lambda: got and got[-1].topic == "cut.end", timeout=20,
                             what="the last publish")
        rejected = pub._require_link().rejected
    assert [m.data["n"] for m in got] == list(range(n + 1))  # each once, in order
    assert len({m.id for m in got}) == n + 1
    assert rejected == 0  # a retry is not mistaken for a replay
    assert client.xlen(Keys(mode.namespace).deadletter) == 0
