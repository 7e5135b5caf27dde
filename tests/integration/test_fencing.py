"""Writes a deposed router could make are fenced by its lease (see coordinator.routing.router)."""

from __future__ import annotations

import redis

from coordinator.cluster.membership import Membership, heartbeat_call, leave_call
from coordinator.errors import BadRequest
from coordinator.keys import REQUEST_GROUP, Keys
from coordinator.routing.rejections import Rejector
from coordinator.routing.view import RoutingView
from coordinator.scripts import scripts_for
from coordinator.settings import Settings


def pending_entry(client: redis.Redis, keys: Keys, fields: dict[str, str]) -> str:
    stream = keys.requests(0)
    try:
        client.xgroup_create(stream, REQUEST_GROUP, id="0", mkstream=True)
    except redis.ResponseError:
        pass
    eid = str(client.xadd(stream, fields))
    client.xreadgroup(REQUEST_GROUP, "deposed", {stream: ">"})
    return eid


def test_a_deposed_router_neither_dead_letters_nor_answers(client: redis.Redis, namespace: str,
                                                           settings: Settings) -> None:
    keys = Keys(namespace)
    Membership(client, keys).register("p1")
    eid = pending_entry(client, keys, {"k": "nope", "s": "p1", "r": "req1"})
    client.set(keys.router_lease(0), "successor")
    view = RoutingView(keys)
    view.refresh(client)
    rejector = Rejector(client, keys, settings, view)
    rejection = rejector.rejection(keys.requests(0), eid, {"k": "nope", "s": "p1", "r": "req1"},
                                   BadRequest("unknown kind"))
    assert rejection.reply_to == "p1"
    inbox_before = client.xlen(keys.responses("p1"))

    assert rejector.write([rejection], keys.router_lease(0), "deposed") == 0
    assert client.xlen(keys.deadletter) == 0
    assert client.xlen(keys.responses("p1")) == inbox_before
    assert client.xpending(keys.requests(0), REQUEST_GROUP)["pending"] == 1

    assert rejector.write([rejection], keys.router_lease(0), "successor") == 1
    (_, dead), = client.xrange(keys.deadletter)
    assert (dead["entry"], dead["reason"], dead["sender"]) == (eid, "bad_request", "p1")
    *_, (_, reply) = client.xrange(keys.responses("p1"))
    assert (reply["r"], reply["ok"], reply["e"]) == ("req1", "0", "bad_request")
    assert client.xpending(keys.requests(0), REQUEST_GROUP)["pending"] == 0


def test_a_deposed_router_cannot_apply_a_leave_or_relay_a_heartbeat(client: redis.Redis,
                                                                    namespace: str) -> None:
    # A leave replayed late by a deposed router would evict a peer that has registered again since.
    keys = Keys(namespace)
    Membership(client, keys).register("p1")
    client.set(keys.router_lease(0), "successor")
    scripts = scripts_for(client)
    seen = client.zscore(keys.members, "p1")

    ks, args = heartbeat_call(keys, "p1", payload="", fence=(keys.router_lease(0), "deposed"))
    assert scripts.heartbeat(keys=ks, args=args) == ["lost"]
    ks, args = leave_call(keys, "p1", "leave", fence=(keys.router_lease(0), "deposed"))
    assert scripts.leave(keys=ks, args=args) == [-1, 0, 0]
    assert client.zscore(keys.members, "p1") == seen  # neither stamped nor removed

    ks, args = heartbeat_call(keys, "p1", payload="", fence=(keys.router_lease(0), "successor"))
    assert scripts.heartbeat(keys=ks, args=args)[0] == "ok"
    ks, args = leave_call(keys, "p1", "leave", fence=(keys.router_lease(0), "successor"))
    assert scripts.leave(keys=ks, args=args)[0] == 1
    assert client.zscore(keys.members, "p1") is None
