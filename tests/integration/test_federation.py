"""Federation: sites on different Redis servers joined through one NATS JetStream server.

Each test runs its sites in this process (a ClusterSidecar per site, which routes and runs the
site's bridge) with peers on every site, on a namespace of its own.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import nats
import pytest
import redis
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from coordinator import ClusterSidecar, Keys, Settings
from coordinator.federation.directory import parse_site
from mixin import Message, NotLeader
from ops.embedded import NatsServer, RedisServer
from ops.metrics import registry
from tests.faultproxy import FaultProxy
from tests.support import Peer, async_wait_for


@asynccontextmanager
async def running_sites(*settings: Settings) -> AsyncIterator[list[ClusterSidecar]]:
    """A sidecar per site, each with its bridge consuming the stream."""
    sidecars = [ClusterSidecar(settings=s, run_duties=False) for s in settings]
    try:
        for sc in sidecars:
            await sc.setup()
        await async_wait_for(lambda: all(sc.bridge and sc.bridge.bridge.consuming for sc in sidecars),
                             timeout=20, what="every site's bridge")
        yield sidecars
    finally:
        for sc in sidecars:
            await sc.teardown()


def site(redis_url: str, nats_url: str, namespace: str, name: str, **more: Any) -> Settings:
    return Settings(redis_url=redis_url, nats_url=nats_url, namespace=namespace, site=name, **more)


def sites_ab(first: RedisServer, second: RedisServer, nats_server: NatsServer, namespace: str,
             **more: Any) -> tuple[Settings, Settings]:
    """Sites ``a`` (on ``first``) and ``b`` (on ``second``) of one NATS, with settings ``more``."""
    return (site(first.url, nats_server.url, namespace, "a", **more),
            site(second.url, nats_server.url, namespace, "b", **more))


LEADER_TIMING = {"heartbeat_interval": 0.2, "member_ttl": 1.0, "router_lease": 0.6}
"""Short timings for the tests of leadership across sites."""


@pytest.fixture
def two(redis_server: RedisServer, second_redis: RedisServer, nats_server: NatsServer,
        namespace: str) -> tuple[Settings, Settings]:
    return (site(redis_server.url, nats_server.url, namespace, "a"),
            site(second_redis.url, nats_server.url, namespace, "b"))


async def peers(stack: AsyncExitStack, *settings: Settings) -> list[Peer]:
    return [await stack.enter_async_context(Peer(settings=s)) for s in settings]


async def stream_messages(nats_url: str, keys: Keys) -> int:
    nc = await nats.connect(nats_url)
    try:
        return int((await nc.jetstream().stream_info(keys.stream_name)).state.messages)
    finally:
        await nc.close()


def bridge_metric(settings: Settings, direction: str, origin: str) -> float | None:
    """``sidecar_bridge_messages_total{direction, site}`` as Prometheus scrapes it from a site."""
    with redis.Redis.from_url(settings.redis_url or "", decode_responses=True) as client:
        text = generate_latest(registry(client, Keys(settings.namespace))).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (sample.name == "sidecar_bridge_messages_total"
                    and sample.labels == {"direction": direction, "site": origin}):
                return float(sample.value)
    return None


async def test_publish_on_one_site_reaches_wildcard_subscribers_on_the_other_once(
        two: tuple[Settings, Settings]) -> None:
    a, b = two
    star: list[Message] = []
    rest: list[Message] = []
    local: list[Message] = []
    async with running_sites(a, b), AsyncExitStack() as stack:
        pa, pb = await peers(stack, a, b)
        await pb.cluster_subscribe("orders.*", star.append)
        await pb.cluster_subscribe("orders.>", rest.append)
        await pa.cluster_subscribe("orders.>", local.append)  # the publisher's own site
        ids = [await pa.cluster_publish("orders.created", {"n": i}, headers={"traceparent": f"t{i}"})
               for i in range(50)]
        ids.append(await pa.cluster_publish("orders.eu.paid", {"n": 50}))
        await async_wait_for(lambda: len(star) == 50 and len(rest) == 51 and len(local) == 51,
                             what="every delivery")
        await asyncio.sleep(0.3)  # anything extra (an echo, a repeat) would have arrived by now
        assert (len(star), len(rest), len(local)) == (50, 51, 51)
        assert await stream_messages(a.nats_url or "", Keys(a.namespace)) == 51  # nothing re-sent
        with redis.Redis.from_url(b.redis_url or "", decode_responses=True) as rb:
            leaving_b = rb.xrange(Keys(b.namespace).responses("bridge-b"))
        assert not [f for _, f in leaving_b if f.get("o")]  # never handed to b's own bridge
        # each bridge's traffic reaches its site's metrics: a sent 51, b delivered 51 from a
        await async_wait_for(lambda: bridge_metric(a, "exported", "a") == 51, what="a's exports counted")
        await async_wait_for(lambda: bridge_metric(b, "imported", "a") == 51, what="b's imports counted")
        assert bridge_metric(a, "imported", "b") is None  # nothing came back
    assert [m.id for m in rest] == ids  # same ids, in publish order
    assert [m.data["n"] for m in star] == list(range(50))
    assert {(m.sender, m.site) for m in rest} == {(pa.id, "a")}
    assert all(m.site is None for m in local)  # this site's own messages
    assert [m.headers["traceparent"] for m in star] == [f"t{i}" for i in range(50)]


async def test_sites_whose_redis_the_lean_connections_do_not_take_federate_through_redis_py(
        two: tuple[Settings, Settings], monkeypatch: pytest.MonkeyPatch) -> None:
    # as for a rediss:// or unix:// URL: the bridge reads its inbox and delivers with redis-py
    from coordinator.federation import export, intake

    monkeypatch.setattr(export, "supports", lambda url: False)
    monkeypatch.setattr(intake, "supports", lambda url: False)
    a, b = two
    got: list[Message] = []
    async with running_sites(a, b), AsyncExitStack() as stack:
        pa, pb = await peers(stack, a, b)
        await pb.cluster_subscribe("orders.>", got.append)
        ids = [await pa.cluster_publish("orders.created", {"n": i}) for i in range(30)]
        await async_wait_for(lambda: len(got) == 30, what="every delivery")
        await asyncio.sleep(0.3)  # a repeat would have arrived by now
    assert [m.id for m in got] == ids


async def test_queue_groups_and_requests_across_sites(two: tuple[Settings, Settings]) -> None:
    a, b = two
    handled: list[tuple[str, int]] = []
    async with running_sites(a, b), AsyncExitStack() as stack:
        pa, m1, m2 = await peers(stack, a, b, b)
        for m in (m1, m2):
            await m.cluster_subscribe("jobs.>", lambda msg, m=m: handled.append((m.id, msg.data)),
                                      queue="workers")
            await m.cluster_subscribe("svc.echo", lambda msg, m=m: {"echo": msg.data, "by": m.id})
        for i in range(20):
            await pa.cluster_publish("jobs.run", i)
        await async_wait_for(lambda: len(handled) == 20, what="the group's twenty")
        answer = await pa.cluster_request("svc.echo", "hi", timeout=10)
    assert sorted(n for _, n in handled) == list(range(20))  # each once in the group
    assert Counter(p for p, _ in handled) == {m1.id: 10, m2.id: 10}
    assert answer["echo"] == "hi" and answer["by"] in (m1.id, m2.id)


async def test_three_sites_never_loop(two: tuple[Settings, Settings], fresh_redis: RedisServer,
                                      nats_server: NatsServer, namespace: str) -> None:
    a, b = two
    c = site(fresh_redis.url, nats_server.url, namespace, "c")
    got: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    async with running_sites(a, b, c), AsyncExitStack() as stack:
        pa, pb, pc = await peers(stack, a, b, c)
        for name, p in (("a", pa), ("b", pb), ("c", pc)):
            await p.cluster_subscribe("t.>", lambda msg, n=name: got[n].append(msg.data))
        for i in range(10):
            await (pa, pb, pc)[i % 3].cluster_publish("t.x", i)
        await async_wait_for(lambda: all(len(v) == 10 for v in got.values()), what="ten on each site")
        await asyncio.sleep(0.5)
        assert await stream_messages(nats_server.url, Keys(namespace)) == 10
    assert all(sorted(v) == list(range(10)) for v in got.values())


async def test_plain_nats_clients_both_ways(two: tuple[Settings, Settings],
                                            nats_server: NatsServer) -> None:
    a, b = two
    keys = Keys(a.namespace)
    got: list[Message] = []
    nc = await nats.connect(nats_server.url)
    plain: list[Any] = []
    try:
        async with running_sites(a, b), AsyncExitStack() as stack:
            pa, pb = await peers(stack, a, b)
            await pa.cluster_subscribe("conductor.set_tempo", got.append)
            await pb.cluster_subscribe("svc.time", lambda msg: {"site": "b", "asked": msg.data})

            async def collect(msg: Any) -> None:
                plain.append(msg)

            await nc.subscribe(keys.subject("conductor.heartbeat"), cb=collect)
            await nc.flush()
            await nc.publish(keys.subject("conductor.set_tempo"), b'{"bpm": 120}')
            await async_wait_for(lambda: got, what="the plain client's message")
            mid = await pb.cluster_publish("conductor.heartbeat", {"beat": 1})
            await async_wait_for(lambda: plain, what="the peer's message on plain NATS")
            answer = await nc.request(keys.subject("svc.time"), b'"now?"', timeout=10)
    finally:
        await nc.close()
    assert got[0].data == {"bpm": 120} and got[0].sender == "nats" and got[0].site == "nats"
    assert plain[0].subject == keys.subject("conductor.heartbeat")
    assert json.loads(plain[0].data) == {"beat": 1}
    assert plain[0].headers["Nats-Msg-Id"] == mid and plain[0].headers["Sidecar-Site"] == "b"
    assert json.loads(answer.data) == {"site": "b", "asked": "now?"}


async def test_bad_messages_on_nats_are_dead_lettered_and_the_bridge_goes_on(
        two: tuple[Settings, Settings], nats_server: NatsServer, redis_server: RedisServer,
        second_redis: RedisServer) -> None:
    a, b = two[0].replace(max_payload_bytes=1000), two[1]
    keys = Keys(a.namespace)
    got: list[Message] = []
    clients = [redis.Redis.from_url(r.url, decode_responses=True) for r in (redis_server, second_redis)]

    def dead() -> list[dict[str, str]]:
        return [f for c in clients for _, f in c.xrange(keys.deadletter)]

    nc = await nats.connect(nats_server.url)
    try:
        async with running_sites(a, b), AsyncExitStack() as stack:
            (pa,) = await peers(stack, a)
            await pa.cluster_subscribe("in.>", got.append)
            js = nc.jetstream()
            subject = keys.stream_subject  # as if site b had sent them: site a receives them
            await js.publish(subject("in.a"), b"not json", headers={"Sidecar-Site": "b"})
            await js.publish(subject("in.b"), b"{}", headers={"Sidecar-Site": "b", "big": "x" * 5000})
            await js.publish(subject("in.c"), b"{}", headers={"Sidecar-Site": "b",
                                                              "Sidecar-Sender": "no spaces allowed"})
            await js.publish(subject("in.d"), json.dumps("x" * 2000).encode(),
                             headers={"Sidecar-Site": "b"})
            # a plain client's garbage: the site whose bridge takes it refuses it
            await nc.publish(keys.subject("in.e"), b"\xff\xfe")
            await js.publish(subject("in.ok"), b'{"fine": true}', headers={"Sidecar-Site": "b"})
            await async_wait_for(lambda: got, what="the good message after the bad ones")
            await async_wait_for(lambda: len(dead()) >= 5, what="five dead letters")
            await asyncio.sleep(0.3)
            letters = dead()
    finally:
        await nc.close()
        for c in clients:
            c.close()
    assert [m.topic for m in got] == ["in.ok"]
    assert Counter(f["reason"] for f in letters) == {"bad_request": 3, "invalid_headers": 1,
                                                     "payload_too_large": 1}
    assert {f["topic"] for f in letters} == {"in.a", "in.b", "in.c", "in.d", "in.e"}


async def test_one_leader_across_sites_and_a_new_one_when_it_goes(
        redis_server: RedisServer, second_redis: RedisServer, nats_server: NatsServer,
        namespace: str) -> None:
    a, b = sites_ab(redis_server, second_redis, nats_server, namespace, **LEADER_TIMING)
    async with running_sites(a, b) as sidecars, AsyncExitStack() as stack:
        everyone = await peers(stack, a, a, b, b)

        def agreed(group: list[Peer]) -> bool:
            views = {(p.leader_id, p.leader_term) for p in group}
            return len(views) == 1 and bool(group[0].leader_id)

        await async_wait_for(lambda: agreed(everyone), timeout=20, what="one leader everywhere")
        first = next(p for p in everyone if p.is_leader)
        assert sum(p.is_leader for p in everyone) == 1
        term = first.leader_term
        await first.teardown()  # leaves: the next leader may come from either site
        rest = [p for p in everyone if p is not first]
        await async_wait_for(lambda: agreed(rest) and rest[0].leader_term > term, timeout=20,
                             what="a new leader everywhere")
        assert sum(p.is_leader for p in rest) == 1
        # every site shows every site, reachable, with its members
        sidecars[0].refresh_status()
        status = sidecars[0].status["clustersidecar"]
        assert set(status["sites"]) == {"a", "b"}
        assert all(s["reachable"] for s in status["sites"].values())
        assert status["cluster_size"] == 3


class Believer(Peer):
    """Records when it starts and stops believing it leads (monotonic time)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.beliefs: list[tuple[float, bool]] = []
        super().__init__(*args, **kwargs)

    def on_leader_change(self, leader_id: str | None, term: int) -> None:
        self.beliefs.append((time.monotonic(), self.is_leader))


async def test_a_site_cut_off_from_nats_fences_its_leader_before_another_site_takes_over(
        redis_server: RedisServer, second_redis: RedisServer, nats_server: NatsServer,
        namespace: str) -> None:
    proxy = FaultProxy(nats_server.port)
    a = site(redis_server.url, f"nats://127.0.0.1:{proxy.port}", namespace, "a", **LEADER_TIMING)
    b = site(second_redis.url, nats_server.url, namespace, "b", **LEADER_TIMING)
    local: list[Message] = []
    try:
        async with running_sites(a, b), AsyncExitStack() as stack:
            pa = await stack.enter_async_context(Believer(settings=a))
            await async_wait_for(lambda: pa.is_leader, timeout=20, what="a leader on site a")
            pb = await stack.enter_async_context(Believer(settings=b))
            await async_wait_for(lambda: pb.leader_id == pa.id, timeout=20, what="b following a")
            await pa.cluster_subscribe("local.*", local.append)
            term = pa.leader_term
            proxy.sever()  # site a is cut off from NATS
            await async_wait_for(lambda: pb.is_leader, timeout=20, what="site b taking over")
            assert not pa.is_leader and pb.leader_term > term
            seen_from_a = redis.Redis.from_url(redis_server.url, decode_responses=True)
            try:
                await async_wait_for(
                    lambda: not parse_site(seen_from_a.hget(Keys(namespace).sites, "b"))["reachable"],
                    what="site a showing b unreachable")
            finally:
                seen_from_a.close()
            with pytest.raises(NotLeader):
                await pa.cluster_publish("orders.x", 1, fenced=True)
            await pa.cluster_publish("local.x", "still routed")  # site a goes on locally
            await async_wait_for(lambda: local, what="local routing on the cut-off site")
            proxy.heal()
            await async_wait_for(lambda: pa.leader_id == pb.id, timeout=20,
                                 what="site a following b once healed")
    finally:
        proxy.close()
    last_led = max(t for t, leads in pa.beliefs if leads)
    stopped = min(t for t, leads in pa.beliefs if not leads and t > last_led)
    started = min(t for t, leads in pb.beliefs if leads)
    assert stopped < started  # never two peers believing they lead at once


async def test_a_site_keeps_one_name_and_a_bridge_configured_otherwise_stays_out(
        redis_server: RedisServer, nats_server: NatsServer, namespace: str,
        caplog: pytest.LogCaptureFixture) -> None:
    from coordinator.federation.bridge import Bridge

    keys = Keys(namespace)
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    unnamed = Settings(redis_url=redis_server.url, nats_url=nats_server.url, namespace=namespace)
    try:
        async with running_sites(unnamed.replace(site="east")):
            assert client.get(keys.site_name) == "east"
            # another worker of the same Redis without SIDECAR_SITE takes the site's name
            follower = Bridge(unnamed, name="w2")
            assert await follower._resolve_site() and follower.site == "east"
            await follower.redis.aclose()
            # one configured with another name refuses to federate, and says why
            stray = Bridge(unnamed.replace(site="west"), name="w3")
            stop = asyncio.Event()
            task = asyncio.create_task(stray.run(stop))
            await async_wait_for(lambda: "this Redis is site 'east'" in caplog.text,
                                 what="the refusal in the log")
            assert not stray.active
            stop.set()
            await task
    finally:
        client.close()
