"""Garbage written straight into the request stream: dead-lettered with a reason, never blocking."""

from __future__ import annotations

import json

import pytest
import redis

from coordinator.errors import InvalidTopic
from coordinator.keys import REQUEST_GROUP, Keys
from tests.e2e.helpers import Peer, Recorder, start_worker
from tests.support import Processes, async_wait_for, sidecar_env

MAX_PAYLOAD = 1_000


def garbage(sender: str) -> dict[str, tuple[dict[str, str], str]]:
    """Name -> (request entry fields, reason code the dead-letter entry must carry)."""
    return {
        "not json": ({"k": "pub", "s": sender, "t": "ok.topic", "d": "{not json"}, "bad_request"),
        "no payload": ({"k": "pub", "s": sender, "t": "ok.topic"}, "bad_request"),
        "no sender": ({"k": "pub", "t": "ok.topic", "d": "{}"}, "bad_request"),
        "no topic": ({"k": "pub", "s": sender, "d": "{}"}, "invalid_topic"),
        "no kind": ({"s": sender, "t": "ok.topic", "d": "{}"}, "bad_request"),
        "unknown kind": ({"k": "explode", "s": sender, "t": "ok.topic"}, "bad_request"),
        "wildcard *": ({"k": "pub", "s": sender, "t": "ok.*", "d": "{}"}, "invalid_topic"),
        "wildcard >": ({"k": "pub", "s": sender, "t": "ok.>", "d": "{}"}, "invalid_topic"),
        "reserved": ({"k": "pub", "s": sender, "t": "cluster.x", "d": "{}"}, "invalid_topic"),
        "empty token": ({"k": "pub", "s": sender, "t": "ok..topic", "d": "{}"}, "invalid_topic"),
        "oversize": ({"k": "pub", "s": sender, "t": "ok.topic",
                      "d": json.dumps("x" * (MAX_PAYLOAD + 1))}, "payload_too_large"),
        "stranger": ({"k": "pub", "s": "01NOTAMEMBER0000000000000", "t": "ok.topic", "d": "{}"},
                     "unknown_peer"),
        "sub no pattern": ({"k": "sub", "s": sender, "r": "r1"}, "invalid_topic"),
        "sub bad pattern": ({"k": "sub", "s": sender, "t": "a.>.b", "r": "r2"}, "invalid_topic"),
        "reg bad info": ({"k": "reg", "s": sender, "m": "[1, 2]", "r": "r3"}, "bad_request"),
        "fenced not leader": ({"k": "pub", "s": sender, "t": "ok.topic", "d": "{}", "f": "7"},
                              "not_leader"),
    }


@pytest.fixture
def env(procs: Processes, redis_url: str, namespace: str, client: redis.Redis) -> dict[str, str]:
    env = sidecar_env(redis_url, namespace, router_lease=1.0, max_payload_bytes=MAX_PAYLOAD)
    start_worker(procs, env, client, "w1")
    return env


async def test_bad_entries_are_dead_lettered_and_good_traffic_flows(
        env: dict[str, str], procs: Processes, redis_url: str, namespace: str,
        client: redis.Redis) -> None:
    keys = Keys(namespace)
    async with Peer(namespace=namespace, redis_url=redis_url) as sub, \
            Peer(namespace=namespace, redis_url=redis_url) as pub:
        rec = Recorder()
        await sub.cluster_subscribe("ok.>", rec)
        await pub.cluster_publish("ok.topic", {"n": "before"})
        await rec.wait_for_count(1)

        cases = garbage(pub.id)
        ids = {client.xadd(keys.requests(0), fields): name for name, (fields, _) in cases.items()}
        await pub.cluster_publish("ok.topic", {"n": "after"})
        await rec.wait_for_data({"n": "after"})
        # the direct data path does not queue behind the request stream: wait for the router
        await async_wait_for(lambda: client.xlen(keys.deadletter) >= len(cases),
                             what="every bad entry dead-lettered")

        assert rec.data == [{"n": "before"}, {"n": "after"}]  # no garbage reached a subscriber
        dead = client.xrange(keys.deadletter)
        assert len(dead) == len(cases), [f["reason"] for _, f in dead]
        by_entry = {f["entry"]: f for _, f in dead}
        assert set(by_entry) == set(ids)
        for eid, name in ids.items():
            entry, reason = by_entry[eid], cases[name][1]
            assert entry["reason"] == reason, (name, entry)
            assert entry["message"], name  # a human-readable explanation
            assert entry["stream"] == keys.requests(0)
            assert json.loads(entry["raw"]) == cases[name][0]
        # the sender hears about every rejection it can be told of (its own id, registered)
        await async_wait_for(lambda: pub._link is not None and pub._link.rejected >= 1,
                             what="a rejection reply to the publisher")
        stats = client.hgetall(keys.stats)
        assert int(stats["rejected"]) == len(cases)
        # nothing stays pending: the router acknowledged every bad entry
        assert int(client.xpending(keys.requests(0), REQUEST_GROUP)["pending"]) == 0
        # and the peer is still a working member
        later = Recorder()
        await pub.cluster_subscribe("later", later)
        await sub.cluster_publish("later", 1)
        await later.wait_for_count(1)
    assert all(p.poll() is None for p in procs.procs), "the worker died on bad input"


async def test_a_refused_control_request_raises_the_routers_error_at_the_caller(
        env: dict[str, str], redis_url: str, namespace: str, client: redis.Redis) -> None:
    # The mixin validates patterns itself; going around that check to the wire shows the router's
    # reply carrying the error code back, rebuilt as the same exception type.
    async with Peer(namespace=namespace, redis_url=redis_url) as peer:
        assert peer._link is not None
        with pytest.raises(InvalidTopic, match="'>' may only be the last token"):
            await peer._link.request("sub", t="a.>.b")
        rec = Recorder()
        await peer.cluster_subscribe("still.works", rec)
        await peer.cluster_publish("still.works", True)
        await rec.wait_for_count(1)
    [(_, entry)] = client.xrange(Keys(namespace).deadletter)
    assert entry["reason"] == "invalid_topic" and entry["sender"] == peer.id
