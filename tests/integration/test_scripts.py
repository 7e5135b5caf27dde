"""Every Lua script in coordinator/lua against a real Redis."""

from __future__ import annotations

import json
from typing import Any

import redis

from coordinator.clock import redis_ms
from coordinator.cluster.membership import Membership, heartbeat_call, leave_call, register_call
from coordinator.keys import REQUEST_GROUP, Keys
from coordinator.scripts import scripts_for
from tests.support import wait_for


def system_topics(client: redis.Redis, keys: Keys) -> list[str]:
    return [f["t"] for _, f in client.xrange(keys.system)]


def pending_entry(client: redis.Redis, stream: str, fields: dict[str, str]) -> str:
    """Add ``fields`` to ``stream`` and read it under consumer 'c1' without acking it."""
    try:
        client.xgroup_create(stream, REQUEST_GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        assert "BUSYGROUP" in str(exc)
    eid = client.xadd(stream, fields)
    client.xreadgroup(REQUEST_GROUP, "c1", {stream: ">"})
    return str(eid)


def pending_count(client: redis.Redis, stream: str) -> int:
    return int(client.xpending(stream, REQUEST_GROUP)["pending"])


# ------------------------------------------------------------------------------------- leases


def test_lease_is_never_stolen_and_renews_by_token(client: redis.Redis, keys: Keys) -> None:
    s = scripts_for(client)
    key = keys.router_lease(0)
    assert s.lease_acquire(keys=[key], args=["A", 10_000]) == 1
    assert s.lease_acquire(keys=[key], args=["B", 10_000]) == 0
    assert client.get(key) == "A"
    client.pexpire(key, 500)
    assert s.lease_acquire(keys=[key], args=["A", 10_000]) == 1  # renewal extends it
    assert client.pttl(key) > 5_000
    assert s.lease_release(keys=[key], args=["B"]) == 0  # not B's to give up
    assert client.get(key) == "A"
    assert s.lease_release(keys=[key], args=["A"]) == 1
    assert client.exists(key) == 0
    assert s.lease_release(keys=[key], args=["A"]) == 0
    assert s.lease_acquire(keys=[key], args=["B", 10_000]) == 1


def test_expired_lease_can_be_taken(client: redis.Redis, keys: Keys) -> None:
    s = scripts_for(client)
    key = keys.beat_lease
    assert s.lease_acquire(keys=[key], args=["A", 150]) == 1
    assert s.lease_acquire(keys=[key], args=["B", 150]) == 0
    wait_for(lambda: s.lease_acquire(keys=[key], args=["B", 10_000]) == 1, timeout=5,
             what="the expired lease to be taken")
    assert client.get(key) == "B"
    assert s.lease_acquire(keys=[key], args=["A", 10_000]) == 0


# ----------------------------------------------------------------------------------- register


def test_register_joins_once(client: redis.Redis, keys: Keys) -> None:
    m = Membership(client, keys)
    assert m.register("p1", role="worker", labels={"zone": "eu"}, priority=3) is True
    assert client.get(keys.routing_version) == "1"
    info = m.info("p1")
    assert info["role"] == "worker" and info["labels"] == {"zone": "eu"}
    assert info["priority"] == "3" and info["eligible"] == "1"
    assert int(info["joined"]) <= int(info["seen"])
    assert m.register("p1", role="worker") is False  # refresh, not a new join
    assert client.get(keys.routing_version) == "1"
    assert system_topics(client, keys) == ["cluster.member.joined"]
    (_, entry), = client.xrange(keys.system)
    assert entry["s"] == "sidecar" and entry["k"] == "pub"
    assert json.loads(entry["d"]) == {"peer_id": "p1", "role": "worker", "labels": {"zone": "eu"},
                                      "priority": 3}
    assert [f["event"] for _, f in client.xrange(keys.events)] == ["joined"]
    assert m.register("p2") is True
    assert client.get(keys.routing_version) == "2"
    assert set(m.members()) == {"p1", "p2"}


def test_register_from_a_router_is_fenced_acks_and_replies(client: redis.Redis, keys: Keys) -> None:
    s = scripts_for(client)
    stream = keys.requests(0)
    eid = pending_entry(client, stream, {"k": "reg", "s": "p1", "r": "rid1"})
    ks, args = register_call(keys, "p1", {}, token="tok", stream=stream, entry_id=eid,
                             request_id="rid1")
    client.set(keys.router_lease(0), "other")
    assert s.register(keys=ks, args=args) == ["lost"]
    assert client.exists(keys.members, keys.responses("p1"), keys.system) == 0
    assert pending_count(client, stream) == 1

    client.set(keys.router_lease(0), "tok")
    client.hset(keys.leader, mapping={"id": "p0", "term": "4"})
    result = s.register(keys=ks, args=args)
    assert result[:4] == ["ok", 1, "p0", "4"]
    assert pending_count(client, stream) == 0
    (_, reply), = client.xrange(keys.responses("p1"))
    assert reply == {"k": "reply", "r": "rid1", "ok": "1", "leader": "p0", "term": "4"}


# ---------------------------------------------------------------------------------- heartbeat


def test_heartbeat_of_a_non_member_says_evicted(client: redis.Redis, keys: Keys) -> None:
    s = scripts_for(client)
    ks, args = heartbeat_call(keys, "ghost")
    status, now, leader, term = s.heartbeat(keys=ks, args=args)
    assert status == "evicted"
    assert now > 0 and leader == "" and term == "0"
    assert client.zscore(keys.members, "ghost") is None
    assert client.exists(keys.member("ghost")) == 0
    assert Membership(client, keys).heartbeat("ghost") is False


def test_heartbeat_stamps_server_time(client: redis.Redis, keys: Keys) -> None:
    s = scripts_for(client)
    Membership(client, keys).register("p1")
    client.zadd(keys.members, {"p1": 1})  # pretend it was seen long ago
    client.hset(keys.leader, mapping={"id": "p1", "term": "2"})
    before = redis_ms(client)
    ks, args = heartbeat_call(keys, "p1", {"load": 0.5})
    status, now, leader, term = s.heartbeat(keys=ks, args=args)
    after = redis_ms(client)
    assert (status, leader, term) == ("ok", "p1", "2")
    assert before <= now <= after
    assert client.zscore(keys.members, "p1") == now
    assert client.hget(keys.member("p1"), "seen") == str(now)
    assert json.loads(client.hget(keys.member("p1"), "extra") or "") == {"load": 0.5}
    ks, args = heartbeat_call(keys, "p1")  # no payload keeps the last one
    assert s.heartbeat(keys=ks, args=args)[0] == "ok"
    assert json.loads(client.hget(keys.member("p1"), "extra") or "") == {"load": 0.5}


# -------------------------------------------------------------------------------------- leave


def subscribe_raw(client: redis.Redis, keys: Keys, *pairs: tuple[str, str]) -> None:
    client.hset(keys.subs, mapping={f"{peer} {pattern}": "" for peer, pattern in pairs})


def test_leave_removes_only_that_peers_subscriptions(client: redis.Redis, keys: Keys) -> None:
    m = Membership(client, keys)
    for peer in ("p1", "p10", "p2"):
        m.register(peer)
    subscribe_raw(client, keys, ("p1", "a.b"), ("p1", "c.>"), ("p10", "a.b"), ("p2", "p1 *"))
    version = int(client.get(keys.routing_version) or 0)
    s = scripts_for(client)
    ks, args = leave_call(keys, "p1", "leave")
    assert s.leave(keys=ks, args=args)[:2] == [1, 2]
    assert set(client.hkeys(keys.subs)) == {"p10 a.b", "p2 p1 *"}
    assert client.zscore(keys.members, "p1") is None
    assert client.exists(keys.member("p1")) == 0
    assert int(client.get(keys.routing_version) or 0) == version + 1
    left = [f for _, f in client.xrange(keys.system) if f["t"] == "cluster.member.left"]
    assert len(left) == 1
    assert json.loads(left[0]["d"]) == {"peer_id": "p1", "reason": "leave", "was_leader": False}
    assert s.leave(keys=ks, args=args)[:2] == [0, 0]  # twice changes nothing more
    assert system_topics(client, keys).count("cluster.member.left") == 1
    assert int(client.get(keys.routing_version) or 0) == version + 1


def test_leave_acks_the_request_and_reports_leadership(client: redis.Redis, keys: Keys) -> None:
    Membership(client, keys).register("p1")
    client.hset(keys.leader, mapping={"id": "p1", "term": "1"})
    stream = keys.requests(0)
    eid = pending_entry(client, stream, {"k": "leave", "s": "p1"})
    ks, args = leave_call(keys, "p1", "evicted", stream=stream, entry_id=eid)
    assert scripts_for(client).leave(keys=ks, args=args)[0] == 1
    assert pending_count(client, stream) == 0
    (_, event), = [e for e in client.xrange(keys.system) if e[1]["t"] == "cluster.member.left"]
    assert json.loads(event["d"])["was_leader"] is True
    assert [f["reason"] for _, f in client.xrange(keys.events) if f["event"] == "left"] == ["evicted"]


def test_silence_guard_spares_a_recently_seen_member(client: redis.Redis, keys: Keys) -> None:
    m = Membership(client, keys)
    m.register("p1")
    subscribe_raw(client, keys, ("p1", "a"))
    s = scripts_for(client)
    ks, args = leave_call(keys, "p1", "expired", silent_ms=60_000)
    assert s.leave(keys=ks, args=args)[:2] == [0, 0]
    assert client.zscore(keys.members, "p1") is not None
    assert client.hkeys(keys.subs) == ["p1 a"]
    assert "cluster.member.left" not in system_topics(client, keys)

    client.zadd(keys.members, {"p1": redis_ms(client) - 120_000})  # silent for two minutes
    assert s.leave(keys=ks, args=args)[:2] == [1, 1]
    assert system_topics(client, keys).count("cluster.member.left") == 1
    assert m.sweep(60.0) == []  # nothing left to evict


def test_sweep_evicts_only_silent_members(client: redis.Redis, keys: Keys) -> None:
    m = Membership(client, keys)
    m.register("old")
    m.register("new")
    client.zadd(keys.members, {"old": redis_ms(client) - 10_000})
    assert m.sweep(3.0) == ["old"]
    assert set(m.members()) == {"new"}


# Regression (fixed) (coordinator/lua/leave.lua, the HSCAN ... MATCH ARGV[1] .. ' *' line): the peer id is
# used as a glob without escaping, so a peer id containing glob characters ('[', ']', '*', '?',
# '\\') leaves its subscriptions behind in the index after leave/evict. Fix: escape the id before
# building the MATCH pattern, e.g. local glob = ARGV[1]:gsub('([%*%?%[%]\\])', '\\%1'), or refuse
# such ids when a peer registers.
def test_leave_removes_subscriptions_of_an_id_with_glob_characters(client: redis.Redis,
                                                                    keys: Keys) -> None:
    peer = "odd[1]"
    Membership(client, keys).register(peer)
    subscribe_raw(client, keys, (peer, "a.b"), ("odd1", "a.b"))
    ks, args = leave_call(keys, peer, "leave")
    assert scripts_for(client).leave(keys=ks, args=args)[:2] == [1, 1]
    assert client.hkeys(keys.subs) == ["odd1 a.b"]


# ---------------------------------------------------------------------------------- subscribe


def test_subscribe_script(client: redis.Redis, keys: Keys) -> None:
    s = scripts_for(client)
    stream = keys.requests(0)

    def call(token: str, op: str, peer: str = "p1") -> Any:
        eid = pending_entry(client, stream, {"k": "sub", "s": peer})
        ks = [keys.router_lease(0), keys.subs, keys.routing_version, stream, keys.responses(peer),
              keys.member(peer), keys.routes, keys.group_turns]
        return s.subscribe(keys=ks, args=[token, REQUEST_GROUP, eid, op, f"{peer} a.*", "r1", 100,
                                          "a.*", peer])

    client.set(keys.router_lease(0), "tok")
    assert call("bad", "add") == ["lost"]
    assert call("tok", "add", "ghost") == ["unknown_peer"]
    assert client.hlen(keys.subs) == 0
    Membership(client, keys).register("p1")
    assert call("tok", "add") == ["ok", 2, 1]
    assert client.hgetall(keys.routes) == {"a.*": "p1"}  # the route index follows
    assert call("tok", "add") == ["ok", 2, 0]  # already subscribed: version unchanged
    assert client.hgetall(keys.routes) == {"a.*": "p1"}
    assert call("tok", "remove") == ["ok", 3, 1]
    assert client.hlen(keys.subs) == 0
    assert client.hlen(keys.routes) == 0
    replies = [f for _, f in client.xrange(keys.responses("p1"))]
    assert [r["v"] for r in replies] == ["2", "2", "3"]
    assert pending_count(client, stream) == 2  # the lost and unknown_peer calls were not acked


# -------------------------------------------------------------------------------------- route


def route_args(token: str, version: str, eid: str, consumer: str = "me") -> list[Any]:
    """One message of p1 (entry ``eid``, with p1's nonce mark 7) for inbox 1, p2's."""
    record = ["msg", f"0:{eid}", "a.b", '{"x":1}', "p1", "1700000000000", 0]
    head = [token, version, REQUEST_GROUP, 1000, 1, 0, consumer, 1, "drop_oldest", 10_000, 1, "p2",
            eid, "p1", f"7 {eid}"]
    first = len(head) + 1
    head[5] = first + len(record)
    return [*head, *record, first, 1]


def route_keys(keys: Keys, *inboxes: str) -> list[str]:
    return [keys.router_lease(0), keys.routing_version, keys.nonces, keys.requests(0),
            keys.inbox_drops, keys.deadletter, *inboxes]


def test_route_is_fenced_by_lease_and_version(client: redis.Redis, keys: Keys) -> None:
    s = scripts_for(client)
    stream = keys.requests(0)
    inbox = keys.responses("p2")
    eid = pending_entry(client, stream, {"k": "pub", "s": "p1", "t": "a.b", "d": '{"x":1}'})
    client.set(keys.router_lease(0), "tok")
    ks = route_keys(keys, inbox)
    assert s.route(keys=ks, args=route_args("tok", "1", eid)) == ["stale", "0"]  # no key: 0
    client.set(keys.routing_version, "3")

    assert s.route(keys=ks, args=route_args("wrong", "3", eid)) == ["lost"]
    assert s.route(keys=ks, args=route_args("tok", "2", eid)) == ["stale", "3"]
    # the entry is pending under another consumer (a deposed router read it): route it first
    assert s.route(keys=ks, args=route_args("tok", "3", eid, consumer="other")) == ["foreign"]
    assert client.exists(inbox, keys.nonces) == 0  # none of these calls wrote anything
    assert pending_count(client, stream) == 1

    assert s.route(keys=ks, args=route_args("tok", "3", eid, consumer=consumer_of(client, stream)))\
        == ["ok", 1]
    assert pending_count(client, stream) == 0
    (_, msg), = client.xrange(inbox)
    assert msg == {"k": "msg", "i": f"0:{eid}", "t": "a.b", "d": '{"x":1}', "s": "p1",
                   "ts": "1700000000000"}
    assert client.hgetall(keys.nonces) == {"p1": f"7 {eid}"}  # stored with the fan-out


def test_route_acks_thousands_of_entries_and_stores_their_marks(client: redis.Redis,
                                                                     keys: Keys) -> None:
    s = scripts_for(client)
    stream = keys.requests(0)
    client.xgroup_create(stream, REQUEST_GROUP, id="0", mkstream=True)
    pipe = client.pipeline(transaction=False)
    for i in range(2_500):
        pipe.xadd(stream, {"k": "pub", "s": "p1", "t": "a.b", "d": str(i)})
    pipe.execute()
    read = client.xreadgroup(REQUEST_GROUP, "me", {stream: ">"}, count=5_000)
    acks = [eid for _, records in read for eid, _ in records]
    assert len(acks) == 2_500
    client.set(keys.router_lease(0), "tok")
    client.set(keys.routing_version, "1")
    marks = [(f"peer{i}", f"{i} 1-{i}") for i in range(1_200)]
    client.hset(keys.nonces, "peer7", "99 1-99")  # a higher mark stored earlier stays
    args: list[Any] = ["tok", "1", REQUEST_GROUP, 1000, len(acks), 0, "me", len(marks), "drop_oldest",
                       10_000, 0, *acks]
    args += [x for pair in marks for x in pair]
    args[5] = len(args) + 1  # no records, no deliveries
    assert s.route(keys=route_keys(keys), args=args) == ["ok", 0]
    assert pending_count(client, stream) == 0
    assert client.hgetall(keys.nonces) == {**dict(marks), "peer7": "99 1-99"}


def consumer_of(client: redis.Redis, stream: str) -> str:
    (entry,) = client.xpending_range(stream, REQUEST_GROUP, "-", "+", 10)
    return str(entry["consumer"])


# -------------------------------------------------------------------------------------- elect


def test_elect_is_sticky_and_picks_priority_then_oldest(client: redis.Redis, keys: Keys) -> None:
    from coordinator.cluster.election import Election

    election = Election(client, keys, member_ttl=3.0)
    assert election.run() == ("none", None, 0)
    m = Membership(client, keys)
    m.register("01B")
    m.register("01A")
    m.register("01C", priority=5)
    m.register("01D", priority=10, eligible=False)
    assert election.run("first") == ("elected", "01C", 1)
    assert election.run() == ("kept", "01C", 1)
    assert election.leader() == ("01C", 1)
    client.zadd(keys.members, {"01C": redis_ms(client) - 60_000})  # the leader went silent
    assert election.run("expired") == ("elected", "01A", 2)  # 01D is not eligible
    ks, args = leave_call(keys, "01A", "leave")
    assert scripts_for(client).leave(keys=ks, args=args)[2] == 1  # was the leader
    assert election.run("leader left") == ("elected", "01B", 3)
    leaders = [json.loads(f["d"]) for _, f in client.xrange(keys.system)
               if f["t"] == "cluster.leader"]
    assert [(d["leader_id"], d["term"]) for d in leaders] == [("01C", 1), ("01A", 2), ("01B", 3)]
    assert leaders[1]["previous"] == "01C" and leaders[1]["reason"] == "expired"
