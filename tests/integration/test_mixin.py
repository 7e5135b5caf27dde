"""Peers (Agent + SidecarMixin) and an in-process ClusterSidecar on a real Redis."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
from ulid import ULID

from coordinator import ClusterSidecar, InvalidTopic, Keys, Settings, SidecarTimeout
from coordinator.cluster.membership import subscription_field
from mixin import Message
from mixin.link import SidecarLink
from ops.embedded import RedisServer
from tests.support import P, async_wait_for


class Cluster:
    """Sidecars and peers of one test; ``close()`` tears all of them down, peers first."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.peers: list[P] = []
        self.sidecars: list[ClusterSidecar] = []

    async def sidecar(self) -> ClusterSidecar:
        s = ClusterSidecar(settings=self.settings, run_duties=False)  # routing only: no sweeps here
        self.sidecars.append(s)
        await s.setup()
        return s

    async def peer(self, id: str | None = None) -> P:
        p = P(namespace=self.settings.namespace, settings=self.settings, id=id)
        self.peers.append(p)
        await p.setup()
        return p

    async def close(self) -> None:
        for p in reversed(self.peers):
            await p.teardown()
        for s in self.sidecars:
            await s.teardown()


def fast(settings: Settings) -> Settings:
    return settings.replace(router_lease=0.6, heartbeat_interval=0.2, member_ttl=1.0,
                            request_timeout=3.0)


@pytest.fixture
async def cluster(settings: Settings) -> AsyncIterator[Cluster]:
    c = Cluster(fast(settings))
    try:
        yield c
    finally:
        await c.close()


def messages(client: redis.Redis, keys: Keys, peer: str) -> list[dict[str, str]]:
    return [f for _, f in client.xrange(keys.responses(peer)) if f.get("k") == "msg"]


async def test_publish_subscribe_with_sync_and_async_handlers(cluster: Cluster) -> None:
    await cluster.sidecar()
    a, b = await cluster.peer(), await cluster.peer()
    plain: list[Message] = []
    coro: list[Message] = []

    async def on_async(msg: Message) -> None:
        coro.append(msg)

    await a.cluster_subscribe("greet.*", plain.append)
    await a.cluster_subscribe("greet.>", on_async)
    await b.cluster_publish("greet.world", {"hi": 1})
    await async_wait_for(lambda: plain and coro, what="both handlers")
    msg = plain[0]
    assert (msg.topic, msg.data, msg.sender) == ("greet.world", {"hi": 1}, b.id)
    assert coro[0] == msg
    assert msg.id and msg.timestamp > 1.6e9  # seconds, from the Redis clock
    assert a.status["p"]["cluster_subscriptions"] == 2
    assert a.status["p"]["sidecar_connected"] is True

    await a.cluster_unsubscribe("greet.*")
    await b.cluster_publish("greet.again", 2)
    await async_wait_for(lambda: len(coro) == 2, what="the second message")
    assert len(plain) == 1 and coro[1].data == 2


async def test_two_handlers_on_one_pattern_both_run(cluster: Cluster) -> None:
    await cluster.sidecar()
    a, b = await cluster.peer(), await cluster.peer()
    first: list[Any] = []
    second: list[Any] = []
    await a.cluster_subscribe("t", lambda m: first.append(m.data))
    await a.cluster_subscribe("t", lambda m: second.append(m.data))
    assert a.cluster_subscriptions == 1
    for n in range(3):
        await b.cluster_publish("t", n)
    await async_wait_for(lambda: len(first) == 3 and len(second) == 3, what="both handlers")
    assert first == second == [0, 1, 2]  # per-publisher order


async def test_concurrent_subscribes_to_one_pattern_each_return_once_the_router_applied_it(
        cluster: Cluster, client: redis.Redis) -> None:
    await cluster.sidecar()
    a, b = await cluster.peer(), await cluster.peer()
    field = subscription_field(a.id, "t.>")
    returned: list[int] = []
    applied: list[bool] = []
    got: list[list[Any]] = [[], []]

    async def subscribe(k: int) -> None:
        await a.cluster_subscribe("t.>", lambda m: got[k].append(m.data))
        returned.append(k)
        applied.append(bool(client.hexists(Keys(a.namespace).subs, field)))

    await asyncio.gather(subscribe(0), subscribe(1))
    assert returned == [0, 1]  # the second call (no request of its own) waited for the first's
    assert applied == [True, True]
    assert a.cluster_subscriptions == 1
    await b.cluster_publish("t.x", 7)
    await async_wait_for(lambda: got == [[7], [7]], what="both handlers")


async def test_a_subscribe_that_fails_leaves_the_next_call_to_subscribe_itself(
        cluster: Cluster, client: redis.Redis) -> None:
    await cluster.sidecar()
    a, b = await cluster.peer(), await cluster.peer()
    link = a._link
    assert link is not None
    real = link.request
    failed: list[str] = []

    async def flaky(kind: str, **fields: Any) -> dict[str, str]:
        if kind == "sub" and not failed:
            failed.append(kind)
            await asyncio.sleep(0.05)  # the second call comes while this one is on its way
            raise SidecarTimeout("the reply was lost")
        return await real(kind, **fields)

    link.request = flaky  # type: ignore[method-assign,assignment]
    got: list[list[Any]] = [[], []]
    first, second = await asyncio.gather(
        a.cluster_subscribe("u.>", lambda m: got[0].append(m.data)),
        a.cluster_subscribe("u.>", lambda m: got[1].append(m.data)), return_exceptions=True)
    assert isinstance(first, SidecarTimeout) and second is None
    assert client.hexists(Keys(a.namespace).subs, subscription_field(a.id, "u.>"))
    await b.cluster_publish("u.x", 1)
    await async_wait_for(lambda: got[1] == [1], what="the second handler")
    assert got[0] == [] and a.cluster_subscriptions == 1


async def test_an_unsubscribe_waits_for_the_subscribe_on_its_way(cluster: Cluster,
                                                                 client: redis.Redis) -> None:
    await cluster.sidecar()
    a = await cluster.peer()
    await asyncio.gather(a.cluster_subscribe("v.>", lambda m: None), a.cluster_unsubscribe("v.>"))
    assert not client.hexists(Keys(a.namespace).subs, subscription_field(a.id, "v.>"))
    assert a.cluster_subscriptions == 0


async def test_a_raising_handler_is_retried_in_order_then_dead_lettered(
        settings: Settings, client: redis.Redis, keys: Keys) -> None:
    cluster = Cluster(settings.replace(handler_backoff=0.02, handler_max_deliveries=5))
    try:
        await cluster.sidecar()
        a, b, c = await cluster.peer(), await cluster.peer(), await cluster.peer()
        seen: list[Any] = []
        tries: dict[str, int] = {}
        c_during_retries: list[bool] = []

        async def flaky(msg: Message) -> None:
            seen.append(msg.data)
            tries[msg.data] = tries.get(msg.data, 0) + 1
            if msg.data == "boom" and tries["boom"] < 3:
                if tries["boom"] == 1:  # c's message must not wait behind b's failing one
                    await c.cluster_publish("x", "from-c")
                raise RuntimeError("handler bug")
            if msg.data == "from-c":
                c_during_retries.append(tries.get("boom", 0) < 3)
            if msg.data == "always":
                raise ValueError("never works")

        await a.cluster_subscribe("x", flaky)
        for data in ("ok1", "boom", "ok2", "always", "ok3"):
            await b.cluster_publish("x", data)
        await async_wait_for(lambda: "ok3" in seen, timeout=20, what="the last message")
        b_seen = [d for d in seen if d != "from-c"]
        assert b_seen == ["ok1", "boom", "boom", "boom", "ok2", *["always"] * 5, "ok3"]  # b's order
        assert c_during_retries == [True]  # c's message flowed while b's was retried
        snap = a.status_snapshot(include_hidden=True)
        assert snap["handler_errors"] == 2 + 5
        assert "handler_errors" not in a.status["p"]
        await async_wait_for(lambda: client.xlen(keys.deadletter) == 1, what="the dead letter")
        (_, dead), = client.xrange(keys.deadletter)
        assert (dead["reason"], dead["peer"], dead["pattern"], dead["topic"], dead["sender"],
                dead["raw"]) == ("handler_failed", a.id, "x", "x", b.id, '"always"')
        assert "ValueError: never works" in dead["message"] and "5 times" in dead["message"]
        await async_wait_for(lambda: client.xpending(keys.responses(a.id), "peer")["pending"] == 0,
                             what="every inbox entry acknowledged")
    finally:
        await cluster.close()


async def test_duplicate_message_ids_are_dropped(cluster: Cluster, client: redis.Redis,
                                                 keys: Keys) -> None:
    await cluster.sidecar()
    a = await cluster.peer()
    got: list[Any] = []
    await a.cluster_subscribe("dup.>", lambda m: got.append((m.id, m.data)))
    entry = {"k": "msg", "i": "0:1-0", "t": "dup.x", "d": "1", "s": "someone", "ts": "1"}
    client.xadd(keys.responses(a.id), entry)
    client.xadd(keys.responses(a.id), entry)  # a router crash can deliver twice
    client.xadd(keys.responses(a.id), {**entry, "i": "0:2-0", "d": "2"})
    await async_wait_for(lambda: any(d == 2 for _, d in got), what="the entry after the repeat")
    assert got == [("0:1-0", 1), ("0:2-0", 2)]


async def test_publish_argument_errors(cluster: Cluster, client: redis.Redis, keys: Keys) -> None:
    await cluster.sidecar()
    a = await cluster.peer()
    before = client.xlen(keys.requests(0))
    with pytest.raises(TypeError):
        await a.cluster_publish("t", object())
    with pytest.raises(InvalidTopic):
        await a.cluster_publish("a.*", 1)
    with pytest.raises(InvalidTopic):
        await a.cluster_publish("cluster.leader", 1)
    with pytest.raises(InvalidTopic):
        await a.cluster_subscribe("a.>.b", print)
    with pytest.raises(TypeError):
        await a.cluster_subscribe("a", "not callable")  # type: ignore[arg-type]
    assert client.xlen(keys.requests(0)) == before  # nothing reached Redis


async def test_subscribe_without_a_router_times_out(settings: Settings) -> None:
    c = Cluster(fast(settings).replace(request_timeout=0.5))
    try:
        sidecar = await c.sidecar()
        a = await c.peer()
        await sidecar.teardown()  # no router serves the namespace any more
        c.sidecars.clear()
        with pytest.raises(SidecarTimeout, match="no reply"):
            await a.cluster_subscribe("t", print)
        assert a.cluster_subscriptions == 0
    finally:
        await c.close()


async def test_seed_usage_example(monkeypatch: pytest.MonkeyPatch, redis_url: str,
                                  namespace: str, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SIDECAR_REDIS_URL", redis_url)
    logger = logging.getLogger("test.seed")
    sidecar = ClusterSidecar(namespace=namespace, logger=logger)
    conductor = P(namespace=namespace, logger=logger)
    try:
        await sidecar.setup()
        await conductor.setup()
        await sidecar.register_peer(conductor.id)
        print(sidecar.status)
        status = sidecar.status
    finally:
        await conductor.teardown()
        await sidecar.teardown()
    assert "'clustersidecar'" in capsys.readouterr().out
    section = status["clustersidecar"]
    assert set(section) >= {"managed_peers", "active_subscriptions", "cluster_size", "leader_id"}
    assert section["managed_peers"] == [conductor.id]
    assert section["cluster_size"] == 1
    assert isinstance(section["active_subscriptions"], int)
    assert section["leader_id"] in (None, conductor.id)
    assert len(conductor.id) == 26 and conductor.short_id == conductor.id[-6:]


# Regression (fixed) (mixin/link.py SidecarLink.open + mixin/delivery.py): a restarted peer starts reading
# its inbox before it can have any handler (cluster_subscribe needs the link that setup() opens),
# so the messages that waited in its stream while it was away are read, matched against an empty
# handler table and acked: silently lost. Fix: let cluster_subscribe() be called before setup()
# (record the handler; setup registers, re-sends the subscriptions, then starts the reader), or
# have open() start _read_loop only after on_rejoin/_resubscribe ran.
async def test_restarted_peer_finds_messages_sent_while_away(cluster: Cluster,
                                                             client: redis.Redis,
                                                             keys: Keys) -> None:
    await cluster.sidecar()
    publisher = await cluster.peer()
    pid = str(ULID())
    first = await cluster.peer(id=pid)
    await first.cluster_subscribe("away.*", lambda m: None)
    link, first._link = first._link, None  # the process dies: no leave, still a member
    cluster.peers.remove(first)
    assert link is not None
    await link.close(leave=False)
    for n in range(3):
        await publisher.cluster_publish(f"away.{n}", n)
    await async_wait_for(lambda: len(messages(client, keys, pid)) == 3, what="the deliveries")

    got: list[Any] = []
    second = await cluster.peer(id=pid)
    await second.cluster_subscribe("away.*", lambda m: got.append(m.data))
    await async_wait_for(lambda: len(got) == 3, timeout=10, what="the waiting messages")
    assert got == [0, 1, 2]


# Regression (fixed) (coordinator/router.py Router._maintain/_take_over): after Redis restarts without
# its data, the router still believes it holds partition 0 (lease_acquire simply re-creates the
# free key), so it never re-runs _take_over and never re-creates the 'routers' consumer group;
# every XREADGROUP then fails with NOGROUP and is retried forever, so nothing is routed again and
# peers cannot re-register. Fix: on a NOGROUP ResponseError in step(), drop the lease (or call
# _take_over(p) again) so the groups are re-created; likewise treat a lease that had to be
# re-created (key missing, not renewed) as a fresh acquisition.
async def test_peer_recovers_after_redis_restart(fresh_redis: RedisServer, namespace: str) -> None:
    settings = fast(Settings(redis_url=fresh_redis.url, namespace=namespace))
    c = Cluster(settings)
    again: RedisServer | None = None
    try:
        await c.sidecar()
        a, b = await c.peer(), await c.peer()
        got: list[Any] = []
        await a.cluster_subscribe("tick", lambda m: got.append(m.data))
        await b.cluster_publish("tick", "before")
        await async_wait_for(lambda: got == ["before"], what="delivery before the restart")

        fresh_redis.kill()
        buffered = [asyncio.ensure_future(b.cluster_publish("tick", f"down{n}")) for n in range(3)]
        await async_wait_for(lambda: not b.sidecar_connected, what="b to notice the outage")
        assert not any(t.done() for t in buffered)  # held while Redis is away
        again = RedisServer(port=fresh_redis.port).start()

        await async_wait_for(lambda: all(t.done() for t in buffered), timeout=30,
                             what="buffered publishes to reach Redis")
        assert all(t.exception() is None for t in buffered)
        check = redis.Redis.from_url(settings.redis_url, decode_responses=True)
        k = Keys(namespace)
        try:
            await async_wait_for(lambda: check.zscore(k.members, a.id) is not None and
                                 check.hexists(k.subs, f"{a.id} tick"), timeout=30,
                                 what="a to register and subscribe again")
        finally:
            check.close()

        async def delivered() -> bool:
            await b.cluster_publish("tick", "after")
            return "after" in got

        await async_wait_for(delivered, timeout=30, interval=0.2, what="delivery after restart")
        assert a.sidecar_connected and b.sidecar_connected
    finally:
        await c.close()
        if again is not None:
            again.stop()


async def test_rejoin_backs_off_and_does_not_flood_the_log(
        settings: Settings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.DEBUG, logger="sidecar.link")
    link = SidecarLink(str(ULID()), settings, on_entry=lambda eid, fields: asyncio.sleep(0, True))
    pauses: list[float] = []
    attempts = 0

    async def request(kind: str, **fields: str) -> dict[str, str]:
        nonlocal attempts
        attempts += 1
        if attempts <= 6:
            raise SidecarTimeout("no router")
        return {"ok": "1"}

    async def pause(seconds: float) -> None:
        pauses.append(seconds)

    monkeypatch.setattr(link, "request", request)
    monkeypatch.setattr(link, "_pause", pause)
    try:
        link._schedule_rejoin()
        await async_wait_for(lambda: not link._rejoining, what="the rejoin to succeed")
    finally:
        await link.close(leave=False)
    assert pauses == [0.5, 1.0, 2.0, 2.0, 2.0, 2.0]
    records = [r for r in caplog.records if "rejoin failed" in r.getMessage()]
    assert [r.levelno for r in records] == [logging.WARNING] + [logging.DEBUG] * 5
    assert "registered again after 6 failed attempts" in caplog.text


async def test_a_parked_message_whose_handler_fails_stays_pending_until_its_retry_succeeds(
        settings: Settings, client: redis.Redis, keys: Keys) -> None:
    # Regression: releasing parked messages acknowledged them even when the handler raised and the
    # message was being retried, so a crash during the retries would have lost it.
    cluster = Cluster(settings.replace(handler_backoff=0.05, handler_max_deliveries=5))
    try:
        await cluster.sidecar()
        a = await cluster.peer()
        client.xadd(keys.responses(a.id), {"k": "msg", "i": "early-1", "t": "pk.x", "d": "1",
                                           "s": "someone", "ts": "1"})
        await async_wait_for(lambda: a._delivery.parked, what="the early message parked")
        tries: list[int] = []
        pending_during_retries: list[int] = []

        def flaky(m: Message) -> None:
            tries.append(1)
            if len(tries) > 1:
                pending_during_retries.append(
                    int(client.xpending(keys.responses(a.id), "peer")["pending"]))
            if len(tries) < 3:
                raise RuntimeError("not yet")

        await a.cluster_subscribe("pk.>", flaky)  # releases the parked message
        await async_wait_for(lambda: len(tries) == 3, what="two retries")
        assert pending_during_retries == [1, 1]  # unacknowledged while retried
        await async_wait_for(lambda: client.xpending(keys.responses(a.id), "peer")["pending"] == 0,
                             what="the message acknowledged once handled")
        assert client.xlen(keys.deadletter) == 0
    finally:
        await cluster.close()


async def test_an_entry_under_retry_is_not_acknowledged_when_the_inbox_is_read_again(
        settings: Settings, client: redis.Redis, keys: Keys) -> None:
    # Regression: after a Redis hiccup the reader reads every pending entry again; the one being
    # retried was in the repeat filter, so it was acknowledged and a crash would have lost it.
    cluster = Cluster(settings.replace(handler_backoff=0.5, handler_max_deliveries=3))
    try:
        await cluster.sidecar()
        a, b = await cluster.peer(), await cluster.peer()
        tries: list[int] = []

        def failing(m: Message) -> None:
            tries.append(1)
            raise RuntimeError("down")

        await a.cluster_subscribe("rr.>", failing)
        await b.cluster_publish("rr.x", 1)
        await async_wait_for(lambda: tries, what="the first try")
        # what the reader does after a lost connection: read its pending entries from the start
        (_, pending), = client.xreadgroup("peer", "c", {keys.responses(a.id): "0"})
        for eid, fields in pending:
            if fields.get("k") == "msg":
                assert not await a._delivery.on_entry(eid, fields)  # not settled: never acknowledged here
        assert client.xpending(keys.responses(a.id), "peer")["pending"] == 1
        await async_wait_for(lambda: client.xlen(keys.deadletter) == 1, timeout=10,
                             what="the dead letter after the last try")
        await async_wait_for(lambda: client.xpending(keys.responses(a.id), "peer")["pending"] == 0,
                             what="acknowledged once settled")
        assert len(tries) == 3
    finally:
        await cluster.close()
