"""Read-only views of a cluster for the CLI, ``sidecar up`` and the dashboard."""

from __future__ import annotations

from typing import Any

from coordinator.clock import redis_ms
from coordinator.cluster.membership import parse_subscription
from coordinator.federation.directory import parse_site
from coordinator.keys import PEER_GROUP, Keys
from coordinator.leases import LeaseToken
from coordinator.policy.store import PolicyStore
from coordinator.protocol import INTERNAL_SUBSCRIPTIONS, parse_status

__all__ = ["cluster_report", "inbox_report", "leadership_report", "members_report", "recent_events",
           "sites_report", "subscriptions_report", "workers_report"]


def members_report(client: Any, keys: Keys) -> list[dict[str, Any]]:
    """Every live member: its class name, role, labels, priority and eligibility, seconds since its
    last heartbeat, whether it leads, its policy state (SYNCED / STALE / NACKED, or NONE while no
    policy is set), its inbox (length, lag: not read yet, pending: read and not acknowledged,
    drops), its own status fields and its last ``publish_heartbeat`` payload (``extra``)."""
    now = redis_ms(client)
    members = client.zrange(keys.members, 0, -1, withscores=True)
    pipe = client.pipeline(transaction=False)
    for peer, _ in members:
        pipe.hgetall(keys.member(peer))
        pipe.xlen(keys.responses(peer))
        pipe.xinfo_groups(keys.responses(peer))
    pipe.hgetall(keys.inbox_drops)
    pipe.hget(keys.leader, "id")
    *replies, drops, leader = pipe.execute(raise_on_error=False)
    policy = {row["peer_id"]: row for row in PolicyStore(client, keys).status()}
    out = []
    for n, (peer, seen) in enumerate(members):
        rec, held, groups = replies[3 * n: 3 * n + 3]
        rec = {} if isinstance(rec, Exception) else rec
        lag, pending = None, 0
        for group in () if isinstance(groups, Exception) else groups:
            if group.get("name") == PEER_GROUP:
                pending = int(group.get("pending") or 0)
                lag = None if group.get("lag") is None else int(group["lag"])
        state = policy.get(peer, {})
        out.append({
            "id": peer,
            "name": rec.get("name") or None,
            "role": rec.get("role", ""),
            "labels": parse_status(rec.get("labels")) or {},
            "priority": int(rec.get("priority", 0) or 0),
            "eligible": rec.get("eligible", "1") == "1",
            "leader": peer == leader,
            "last_seen_s": round(max(0, now - seen) / 1000, 3),
            "joined_s_ago": round(max(0, now - int(rec.get("joined", now) or now)) / 1000, 1),
            "policy_state": state.get("state", "NONE"),
            "policy_version": state.get("applied"),
            "inbox_length": 0 if isinstance(held, Exception) else int(held),
            "inbox_lag": lag,
            "inbox_pending": pending,
            "inbox_drops": int(drops.get(peer, 0) or 0),
            "status": parse_status(rec.get("status")) or {},  # what a peer says of itself: checked
            "extra": parse_status(rec.get("extra")),
        })
    return out


def workers_report(client: Any, keys: Keys, partitions: int) -> dict[str, Any]:
    """The sidecar's own processes: each router with the partitions whose lease it holds and when
    it last checked in, who holds each partition's lease and for how long still, and the beat's
    and the bridge's leases (holder name, pid and seconds left)."""
    now = redis_ms(client)
    pipe = client.pipeline(transaction=False)
    pipe.zrange(keys.routers, 0, -1, withscores=True)
    for p in range(partitions):
        pipe.get(keys.router_lease(p))
        pipe.pttl(keys.router_lease(p))
    for key in (keys.beat_lease, keys.bridge_lease):
        pipe.get(key)
        pipe.pttl(key)
    routers, *leases = pipe.execute()

    def holder(token: Any, ttl: Any) -> dict[str, Any] | None:
        parsed = LeaseToken.parse(token)
        if parsed is None:
            return None
        return {"name": parsed.name, "pid": parsed.pid,
                "expires_in_s": round(int(ttl) / 1000, 3) if int(ttl) >= 0 else None}

    held = [holder(leases[2 * p], leases[2 * p + 1]) for p in range(partitions)]
    rows = [{"name": str(name), "checked_in_s_ago": round(max(0, now - score) / 1000, 3),
             "partitions": [p for p, h in enumerate(held) if h and h["name"] == str(name)]}
            for name, score in routers]
    return {"routers": rows,
            "partitions": [{"partition": p, "holder": h} for p, h in enumerate(held)],
            "beat": holder(leases[-4], leases[-3]),
            "bridge": holder(leases[-2], leases[-1])}


def cluster_report(client: Any, keys: Keys) -> dict[str, Any]:
    """Cluster size, leader and term, subscriptions, routers, routing counters and the data path
    in force (``direct`` or ``routed``: coordinator.routing.direct)."""
    pipe = client.pipeline(transaction=False)
    pipe.zcard(keys.members)
    pipe.hgetall(keys.leader)
    pipe.hkeys(keys.subs)
    pipe.hgetall(keys.stats)
    pipe.zrange(keys.routers, 0, -1)
    pipe.xlen(keys.deadletter)
    pipe.get(keys.policy_version)
    pipe.hvals(keys.inbox_drops)
    pipe.hget(keys.dataplane, "mode")
    pipe.hgetall(keys.throttled)
    size, leader, subs, stats, routers, dead, policy, drops, mode, throttled = pipe.execute()
    return {
        "namespace": keys.namespace,
        "cluster_size": int(size),
        "leader_id": leader.get("id") or None,
        "leader_term": int(leader.get("term", 0) or 0),
        "active_subscriptions": sum(1 for row in _subscriptions(subs) if not row["internal"]),
        "routers": list(routers),
        "routed": int(stats.get("routed", 0)),
        "delivered": int(stats.get("delivered", 0)),
        "rejected": int(stats.get("rejected", 0)),
        "deadletters": int(dead),
        "policy_version": int(policy or 0),
        "inbox_drops": sum(int(d or 0) for d in drops),
        "data_path": mode or "routed",
        "dropped_requests": int(stats.get("dropped_requests", 0)),
        "throttled": {str(peer): float(wait) for peer, wait in sorted(throttled.items())},
        "sites": {name: {"members": len(site["members"]), "leader": site["leader"],
                         "reachable": site["reachable"]}
                  for name, site in sites_report(client, keys).items()},
    }


def sites_report(client: Any, keys: Keys) -> dict[str, dict[str, Any]]:
    """With federation on, every site as this site's bridge last saw it on NATS: members (id ->
    role), the leader it runs under, its active bridge and whether it is reachable ({} when this
    site is not federated)."""
    return {str(k): parse_site(v) for k, v in sorted(client.hgetall(keys.sites).items())}


def recent_events(client: Any, keys: Keys, count: int = 20) -> list[dict[str, Any]]:
    """The latest membership and leadership events, newest last: ``id``, ``at_ms`` (Redis time),
    ``event`` (joined / left / leader) and its fields; a leadership event names ``leader_id``,
    ``leader_term`` (an int, as everywhere) and the ``previous`` leader."""
    entries = client.xrevrange(keys.events, count=count)
    out = []
    for eid, fields in reversed(entries):
        row: dict[str, Any] = {"id": eid, "at_ms": int(str(eid).partition("-")[0])}
        for name, value in fields.items():
            if name == "term":
                row["leader_term"] = int(value or 0)
            elif name == "leader":
                row["leader_id"] = value
            else:
                row[name] = value
        out.append(row)
    return out


def leadership_report(client: Any, keys: Keys, count: int = 1000) -> list[dict[str, Any]]:
    """Leader and term history, newest last: each term with its leader, when it began (Redis ms),
    the leader before it and why the leadership moved (from the latest ``count`` events)."""
    return [{"leader_term": e["leader_term"], "leader_id": e.get("leader_id") or None,
             "previous": e.get("previous") or None, "reason": e.get("reason") or None,
             "at_ms": e["at_ms"]}
            for e in recent_events(client, keys, count) if e.get("event") == "leader"]


def _subscriptions(fields: Any) -> list[dict[str, Any]]:
    rows = []
    for field in fields:
        peer, pattern, queue = parse_subscription(field)
        rows.append({"pattern": pattern, "queue": queue or None, "peer": peer,
                     "internal": pattern in INTERNAL_SUBSCRIPTIONS})
    return sorted(rows, key=lambda r: (r["pattern"], r["queue"] or "", r["peer"]))


def subscriptions_report(client: Any, keys: Keys, *, internal: bool = False) -> list[dict[str, Any]]:
    """Every subscription: pattern, queue group (None: a plain one) and peer, sorted; the ones each
    peer makes for its own bookkeeping (``cluster.leader``) only with ``internal``."""
    return [row for row in _subscriptions(client.hkeys(keys.subs)) if internal or not row["internal"]]


def inbox_report(client: Any, keys: Keys, peer: str) -> dict[str, Any] | None:
    """``peer``'s inbox: entries held, read but not acknowledged (pending), not read yet (lag),
    the oldest entry's age, and what a full inbox dropped or refused (None: no such inbox)."""
    inbox = keys.responses(peer)
    pipe = client.pipeline(transaction=False)
    pipe.exists(inbox)
    pipe.zscore(keys.members, peer)
    pipe.hget(keys.inbox_drops, peer)
    exists, seen, drops = pipe.execute()
    if not exists and seen is None:
        return None
    length, pending, lag, oldest_s = 0, 0, None, None
    if exists:
        now = redis_ms(client)
        length = int(client.xlen(inbox))
        for group in client.xinfo_groups(inbox):
            if group.get("name") == PEER_GROUP:
                pending = int(group.get("pending") or 0)
                lag = None if group.get("lag") is None else int(group["lag"])
        first = client.xrange(inbox, count=1)
        if first:
            oldest_s = round(max(0, now - int(str(first[0][0]).partition("-")[0])) / 1000, 3)
    return {"peer": peer, "member": seen is not None, "length": length, "pending": pending,
            "lag": lag, "oldest_s": oldest_s, "drops": int(drops or 0)}
