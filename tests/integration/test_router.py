"""The router against a real Redis: delivery, wildcards, bad input, standby and takeover."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from coordinator.cluster.membership import Membership
from coordinator.keys import REQUEST_GROUP, Keys
from coordinator.routing.router import Router
from coordinator.settings import Settings
from tests.support import wait_for

P1, P2, P3 = "01AAAAAAAAAAAAAAAAAAAAAAP1", "01AAAAAAAAAAAAAAAAAAAAAAP2", "01AAAAAAAAAAAAAAAAAAAAAAP3"


@pytest.fixture
def fast(settings: Settings) -> Settings:
    """Short leases so takeovers happen within a second."""
    return settings.replace(router_lease=0.6)


@pytest.fixture
def routers() -> Iterator[list[Router]]:
    made: list[Router] = []
    yield made
    for r in made:
        r.stop()


def router(routers: list[Router], client: redis.Redis, s: Settings, name: str) -> Router:
    r = Router(client, s, name=name)
    routers.append(r)
    return r


def request(client: redis.Redis, keys: Keys, **fields: str) -> str:
    """Write a request entry the way mixin/link.py does."""
    return str(client.xadd(keys.requests(0), fields))


def sub(client: redis.Redis, keys: Keys, peer: str, pattern: str, kind: str = "sub") -> str:
    rid = uuid.uuid4().hex[:16]
    request(client, keys, k=kind, s=peer, r=rid, t=pattern)
    return rid


def pub(client: redis.Redis, keys: Keys, peer: str, topic: str, data: object) -> str:
    return request(client, keys, k="pub", s=peer, t=topic, d=json.dumps(data))


def inbox(client: redis.Redis, keys: Keys, peer: str, kind: str) -> list[dict[str, str]]:
    return [f for _, f in client.xrange(keys.responses(peer)) if f.get("k") == kind]


def reply_to(client: redis.Redis, keys: Keys, peer: str, rid: str) -> dict[str, str]:
    return wait_for(lambda: next((f for f in inbox(client, keys, peer, "reply")
                                  if f.get("r") == rid), None), what=f"reply {rid}")


def topics_of(client: redis.Redis, keys: Keys, peer: str) -> list[str]:
    return [f["t"] for f in inbox(client, keys, peer, "msg")]


def drain(r: Router) -> None:
    """Step ``r`` by hand until a read comes back empty."""
    while r.step():
        pass


def members(client: redis.Redis, keys: Keys, *peers: str) -> None:
    m = Membership(client, keys)
    for peer in peers:
        m.register(peer)


def test_subscribe_then_publish_delivers(client: redis.Redis, keys: Keys, fast: Settings,
                                         routers: list[Router]) -> None:
    members(client, keys, P1, P2)
    router(routers, client, fast, "r1").start()
    reply = reply_to(client, keys, P2, sub(client, keys, P2, "orders.created"))
    assert reply["ok"] == "1" and reply["k"] == "reply"
    eid = pub(client, keys, P1, "orders.created", {"id": 7})
    msg = wait_for(lambda: inbox(client, keys, P2, "msg"), what="delivery")[0]
    assert msg["t"] == "orders.created"
    assert json.loads(msg["d"]) == {"id": 7}
    assert msg["s"] == P1
    assert msg["i"].endswith(eid)
    assert msg["ts"] == eid.split("-")[0]
    assert inbox(client, keys, P1, "msg") == []  # the publisher is not subscribed
    wait_for(lambda: client.xpending(keys.requests(0), REQUEST_GROUP)["pending"] == 0)
    # counters are written at the router's next lease renewal (off the hot path)
    wait_for(lambda: int(client.hget(keys.stats, "delivered") or 0) >= 1, what="the counters")


def test_wildcards(client: redis.Redis, keys: Keys, fast: Settings, routers: list[Router]) -> None:
    members(client, keys, P1, P2, P3)
    router(routers, client, fast, "r1").start()
    reply_to(client, keys, P2, sub(client, keys, P2, "a.*"))
    reply_to(client, keys, P3, sub(client, keys, P3, "a.>"))
    for topic in ("a.b", "a.b.c", "a", "b.a", "a.x"):
        pub(client, keys, P1, topic, topic)
    pub(client, keys, P1, "end", None)
    reply_to(client, keys, P1, sub(client, keys, P1, "end"))
    pub(client, keys, P1, "end", None)
    wait_for(lambda: inbox(client, keys, P1, "msg"), what="the end marker")
    assert topics_of(client, keys, P2) == ["a.b", "a.x"]
    assert topics_of(client, keys, P3) == ["a.b", "a.b.c", "a.x"]


def test_unsubscribe_stops_delivery(client: redis.Redis, keys: Keys, fast: Settings,
                                    routers: list[Router]) -> None:
    members(client, keys, P1, P2)
    router(routers, client, fast, "r1").start()
    reply_to(client, keys, P2, sub(client, keys, P2, "x"))
    reply_to(client, keys, P2, sub(client, keys, P2, "marker"))
    pub(client, keys, P1, "x", 1)
    assert reply_to(client, keys, P2, sub(client, keys, P2, "x", kind="unsub"))["ok"] == "1"
    pub(client, keys, P1, "x", 2)
    pub(client, keys, P1, "marker", 3)  # same publisher, so FIFO: x=2 would come before it
    wait_for(lambda: "marker" in topics_of(client, keys, P2), what="the marker")
    assert [json.loads(f["d"]) for f in inbox(client, keys, P2, "msg")] == [1, 3]
    assert client.hkeys(keys.subs) == [f"{P2} marker"]


def test_bad_input_is_dead_lettered_and_good_traffic_flows(client: redis.Redis, keys: Keys,
                                                           fast: Settings,
                                                           routers: list[Router]) -> None:
    s = fast.replace(max_payload_bytes=128)  # join events still fit
    members(client, keys, P1, P2)
    r = router(routers, client, s, "r1")
    r.step()  # take partition 0 and route the registrations
    rid = sub(client, keys, P2, "good")
    drain(r)
    assert reply_to(client, keys, P2, rid)["ok"] == "1"
    expected: dict[str, str] = {}  # entry id -> reason
    first = pub(client, keys, P1, "good", {"n": 1})
    expected[request(client, keys, k="pub", s=P1, t="good", d="{not json")] = "bad_request"
    expected[request(client, keys, k="pub", s=P1, t="good")] = "bad_request"
    expected[request(client, keys, k="pub", t="good", d="1")] = "bad_request"
    expected[request(client, keys, k="zap", s=P1, r="rz")] = "bad_request"
    expected[request(client, keys, s=P1, r="rn")] = "bad_request"
    expected[pub(client, keys, P1, "a.*", 1)] = "invalid_topic"
    expected[pub(client, keys, P1, "a..b", 1)] = "invalid_topic"
    expected[pub(client, keys, P1, "cluster.leader", {"leader_id": P1})] = "invalid_topic"
    expected[request(client, keys, k="sub", s=P1, r="rb", t="a.>.b")] = "invalid_topic"
    expected[pub(client, keys, P1, "good", "x" * 200)] = "payload_too_large"
    expected[pub(client, keys, "ghost", "good", 1)] = "unknown_peer"
    expected[request(client, keys, k="pub", s=P1, t="good", d="1", f="1")] = "not_leader"
    last = pub(client, keys, P1, "good", {"n": 2})
    drain(r)

    dead = {f["entry"]: f for _, f in client.xrange(keys.deadletter)}
    assert {eid: f["reason"] for eid, f in dead.items()} == expected
    assert all(f["message"] for f in dead.values())
    assert dead[next(iter(expected))]["sender"] == P1
    errors = {f["ref"]: f for f in inbox(client, keys, P1, "reply") if f["ok"] == "0"}
    no_reply = {e for e, f in dead.items() if f["sender"] in ("", "ghost")}  # nobody to tell
    assert len(no_reply) == 2
    assert set(errors) == set(expected) - no_reply
    assert all(errors[e]["e"] == expected[e] for e in errors)
    assert not client.exists(keys.responses("ghost"))
    delivered = inbox(client, keys, P2, "msg")
    assert [json.loads(f["d"]) for f in delivered] == [{"n": 1}, {"n": 2}]
    assert delivered[0]["i"].endswith(first) and delivered[1]["i"].endswith(last)
    assert client.xpending(keys.requests(0), REQUEST_GROUP)["pending"] == 0
    assert r.stats["rejected"] == len(expected)


# Regression (fixed) (coordinator/router.py, Router.process): a run of publishes is not split when the
# stream changes, so one XREADGROUP batch holding a peer's publish AND a system event (here
# cluster.member.joined) is routed as one run judged by the first entry's stream: the system
# event is treated as an untrusted request ("sidecar" is not a member -> dead-lettered as
# unknown_peer) and acked on the wrong stream, so it also stays pending on the system stream.
# (With the streams the other way round a peer publish would be trusted and could use
# 'cluster.' topics.) Fix: in process(), flush `run` when entry[0] != run[0][0] before appending.
def test_system_events_and_publishes_in_one_batch(client: redis.Redis, keys: Keys,
                                                  fast: Settings, routers: list[Router]) -> None:
    members(client, keys, P1, P2)
    r = router(routers, client, fast, "r1")
    r.step()
    s1, s2 = sub(client, keys, P2, "cluster.member.joined"), sub(client, keys, P2, "news")
    drain(r)
    assert {f["r"] for f in inbox(client, keys, P2, "reply")} >= {s1, s2}
    pub(client, keys, P1, "news", "hello")
    Membership(client, keys).register(P3)  # announces the join on the system stream
    drain(r)
    assert client.xlen(keys.deadletter) == 0
    assert sorted(topics_of(client, keys, P2)) == ["cluster.member.joined", "news"]
    assert client.xpending(keys.system, REQUEST_GROUP)["pending"] == 0


def test_standby_takes_over_after_stop(client: redis.Redis, keys: Keys, fast: Settings,
                                       routers: list[Router]) -> None:
    members(client, keys, P1, P2)
    r1 = router(routers, client, fast, "r1")
    r1.start()
    wait_for(lambda: r1.partitions == [0], what="r1 to own partition 0")
    r2 = router(routers, client, fast, "r2")
    r2.start()
    first_seen = wait_for(lambda: client.zscore(keys.routers, "r2"), what="r2 to check in")
    wait_for(lambda: (client.zscore(keys.routers, "r2") or 0) > first_seen,
             what="r2 to finish a full maintenance round")
    assert r2.partitions == []
    assert client.get(keys.router_lease(0)) == r1.token
    reply_to(client, keys, P2, sub(client, keys, P2, "t"))
    pub(client, keys, P1, "t", 1)
    wait_for(lambda: r1.stats["routed"] == 1, what="r1 to route the publish")
    assert len(inbox(client, keys, P2, "msg")) == 1
    assert r2.stats["routed"] == 0

    r1.stop()
    assert not r1.running
    assert client.get(keys.router_lease(0)) != r1.token  # released, not left to expire
    wait_for(lambda: r2.partitions == [0], timeout=5, what="r2 to take partition 0")
    pub(client, keys, P1, "t", 2)
    wait_for(lambda: r2.stats["routed"] == 1, what="r2 to route the publish")
    assert [json.loads(f["d"]) for f in inbox(client, keys, P2, "msg")] == [1, 2]


def test_takeover_after_crash_reroutes_pending_in_order(client: redis.Redis, keys: Keys,
                                                        fast: Settings,
                                                        routers: list[Router]) -> None:
    members(client, keys, P1, P2)
    # r1 is stepped by hand and then abandoned: a crash. (Setting r1._stop on a running thread
    # would not do: run() releases every lease on its way out, which is a clean stop.)
    r1 = Router(client, fast, name="r1")
    routers.append(r1)  # only so its socket is closed at the end; it never runs again
    r1.step()
    assert r1.partitions == [0]
    rid = sub(client, keys, P2, "seq.>")
    drain(r1)
    assert reply_to(client, keys, P2, rid)["ok"] == "1"
    for n in range(1, 6):
        pub(client, keys, P1, f"seq.{n}", n)
    client.xreadgroup(REQUEST_GROUP, r1.name, {keys.requests(0): ">"})  # read, never acked
    pending = client.xpending(keys.requests(0), REQUEST_GROUP)
    assert pending["pending"] == 5 and {c["name"] for c in pending["consumers"]} == {"r1"}
    for n in range(6, 8):  # written after the crash, never read by r1
        pub(client, keys, P1, f"seq.{n}", n)
    assert client.get(keys.router_lease(0)) == r1.token  # left to expire, not released

    r2 = router(routers, client, fast, "r2")
    r2.start()
    wait_for(lambda: len(inbox(client, keys, P2, "msg")) >= 7, timeout=10,
             what="the pending and the new entries to be routed by r2")
    assert [json.loads(f["d"]) for f in inbox(client, keys, P2, "msg")] == list(range(1, 8))
    assert r2.partitions == [0] and r2.stats["takeovers"] == 1
    assert client.get(keys.router_lease(0)) == r2.token
    wait_for(lambda: client.xpending(keys.requests(0), REQUEST_GROUP)["pending"] == 0)


def test_an_entry_that_breaks_the_router_is_dead_lettered_and_the_rest_flow(
        client: redis.Redis, keys: Keys, fast: Settings, routers: list[Router],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # a fault nobody foresaw, tripped by one topic: it must not wedge the partition
    members(client, keys, P1, P2)
    r = router(routers, client, fast, "r1")
    original = r.view.match

    def match(topic: str) -> tuple[str, ...]:
        if topic == "poison.pill":
            raise RuntimeError("unforeseen")
        return original(topic)

    monkeypatch.setattr(r.view, "match", match)
    r.start()
    reply_to(client, keys, P2, sub(client, keys, P2, ">"))
    r.stop()  # queue one batch that mixes good and bad publishes and a subscribe, then route it
    good = [pub(client, keys, P1, "ok.before", 1), pub(client, keys, P1, "poison.pill", 2),
            pub(client, keys, P1, "ok.after", 3)]
    rid = sub(client, keys, P2, "more.>")
    good.append(pub(client, keys, P1, "ok.last", 4))
    r.start()
    assert reply_to(client, keys, P2, rid)["ok"] == "1"
    wait_for(lambda: "ok.last" in topics_of(client, keys, P2), what="the last good publish")
    assert [t for t in topics_of(client, keys, P2) if not t.startswith("cluster.")] == \
        ["ok.before", "ok.after", "ok.last"]
    # and alone, as sparse traffic sends it: a run of one
    lone = pub(client, keys, P1, "poison.pill", 5)
    wait_for(lambda: client.xlen(keys.deadletter) == 2, what="the lone bad publish refused")
    pub(client, keys, P1, "ok.later", 6)
    wait_for(lambda: "ok.later" in topics_of(client, keys, P2), what="the publish after it")
    dead = [f for _, f in client.xrange(keys.deadletter)]
    assert [(f["entry"], f["reason"]) for f in dead] == [(good[1], "internal_error"),
                                                         (lone, "internal_error")]
    assert all("RuntimeError" in f["message"] for f in dead)
    wait_for(lambda: int(client.xpending(keys.requests(0), REQUEST_GROUP)["pending"]) == 0,
             what="nothing left pending")


@pytest.mark.parametrize("lost", ["before the fan-out ran", "the fan-out's reply"])
def test_an_error_mid_batch_settles_what_was_read_exactly_once(
        client: redis.Redis, keys: Keys, fast: Settings, routers: list[Router],
        monkeypatch: pytest.MonkeyPatch, lost: str) -> None:
    members(client, keys, P1, P2)
    r = router(routers, client, fast, "r1")
    r.start()
    reply_to(client, keys, P2, sub(client, keys, P2, "n.>"))
    r.stop()
    assert r.fast is not None
    send = r.fast.pipeline
    failed: list[str] = []

    def flaky(commands: list[tuple[object, ...]], timeout: float) -> list[object]:
        if not failed and commands[0][0] == "EVALSHA":
            failed.append(lost)
            if lost == "the fan-out's reply":
                send(commands, timeout)  # it ran; the router never hears so
            raise redis.ConnectionError("connection reset (injected)")
        return send(commands, timeout)

    monkeypatch.setattr(r.fast, "pipeline", flaky)
    for i in range(20):
        pub(client, keys, P1, f"n.{i}", i)
    r.start()
    wait_for(lambda: failed, what="the injected failure")
    # the router handles entries in order: once this one is delivered, any repeat of the failed
    # batch's fan-out would have been written before it
    pub(client, keys, P1, "n.end", "end")
    wait_for(lambda: "n.end" in topics_of(client, keys, P2), what="the publish after the failure")
    assert failed == [lost]
    assert topics_of(client, keys, P2) == [*(f"n.{i}" for i in range(20)), "n.end"]  # once each
    assert int(client.xpending(keys.requests(0), REQUEST_GROUP)["pending"]) == 0


def test_a_fan_out_written_before_lingering_is_settled_by_the_next_read_or_at_stop(
        client: redis.Redis, keys: Keys, fast: Settings, routers: list[Router],
        monkeypatch: pytest.MonkeyPatch) -> None:
    members(client, keys, P1, P2)
    # a linger long enough that a loaded machine cannot overrun it between busy() and the step
    r = router(routers, client, fast.replace(router_linger=0.05), "r1")
    sub(client, keys, P2, "b.>")
    drain(r)
    assert r.fast is not None
    written: list[object] = []
    send = r.fast.send
    monkeypatch.setattr(r.fast, "send", lambda commands: (written.append(commands[0][0]),
                                                          send(commands))[1])

    def busy() -> None:  # as if entries had been arriving at a million per second
        r.coalescer.rate, r.coalescer._last_read = 1e6, time.monotonic()

    for stop_while_lingering in (False, True):
        routed = r.stats["routed"]
        for i in range(3):
            pub(client, keys, P1, f"b.{stop_while_lingering}.{i}", i)
        assert r.step() == 3 and r.inflight.fanout is not None  # read; its fan-out deferred
        busy()
        if stop_while_lingering:
            r._stop.set()
            assert r.step() == 0  # wrote the fan-out, then stopped instead of lingering
            assert r.inflight.written
            r.flush()  # what a stopping router does: reads the answer it is owed
            r._stop.clear()
        else:
            r.step()  # wrote the fan-out, lingered, then read: the answer came with the read
        assert written == ["EVALSHA"]  # written on its own before lingering
        written.clear()
        assert r.inflight.fanout is None and not r.inflight.written
        assert r.stats["routed"] == routed + 3
        assert topics_of(client, keys, P2)[-3:] == [f"b.{stop_while_lingering}.{i}" for i in range(3)]
    assert int(client.xpending(keys.requests(0), REQUEST_GROUP)["pending"]) == 0
    assert len(topics_of(client, keys, P2)) == 6  # each once
