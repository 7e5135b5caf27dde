"""Read-only views of a cluster for the CLI, ``sidecar up`` and the dashboard."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from coordinator.clock import redis_ms
from coordinator.federation.directory import parse_site
from coordinator.keys import PEER_GROUP, Keys

__all__ = ["cluster_report", "inbox_report", "members_report", "recent_events", "sites_report",
           "subscriptions_report"]


def members_report(client: Any, keys: Keys) -> list[dict[str, Any]]:
    """Every live member with role, priority, eligibility, seconds since its last heartbeat and the
    messages its full inbox dropped or refused."""
    now = redis_ms(client)
    members = client.zrange(keys.members, 0, -1, withscores=True)
    pipe = client.pipeline(transaction=False)
    for peer, _ in members:
        pipe.hgetall(keys.member(peer))
    pipe.hgetall(keys.inbox_drops)
    *records, drops = pipe.execute()
    out = []
    for (peer, seen), rec in zip(members, records, strict=True):
        extra: Any = rec.get("extra")
        if extra:
            with contextlib.suppress(ValueError):
                extra = json.loads(extra)
        out.append({
            "id": peer,
            "role": rec.get("role", ""),
            "priority": int(rec.get("priority", 0) or 0),
            "eligible": rec.get("eligible", "1") == "1",
            "last_seen_s": round(max(0, now - seen) / 1000, 3),
            "joined_s_ago": round(max(0, now - int(rec.get("joined", now) or now)) / 1000, 1),
            "inbox_drops": int(drops.get(peer, 0) or 0),
            "extra": extra,
        })
    return out


def cluster_report(client: Any, keys: Keys) -> dict[str, Any]:
    """Cluster size, leader and term, subscriptions, routers, routing counters and the data path
    in force (``direct`` or ``routed``: coordinator.routing.direct)."""
    pipe = client.pipeline(transaction=False)
    pipe.zcard(keys.members)
    pipe.hgetall(keys.leader)
    pipe.hlen(keys.subs)
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
        "active_subscriptions": int(subs),
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


def recent_events(client: Any, keys: Keys, count: int = 20) -> list[dict[str, str]]:
    """The latest membership and leadership events, newest last."""
    entries = client.xrevrange(keys.events, count=count)
    return [{"id": eid, **fields} for eid, fields in reversed(entries)]


def subscriptions_report(client: Any, keys: Keys) -> list[dict[str, Any]]:
    """Every subscription: pattern, queue group (None: a plain one) and peer, sorted."""
    rows = []
    for field in client.hkeys(keys.subs):
        peer, _, rest = str(field).partition(" ")
        pattern, _, queue = rest.partition(" ")
        rows.append({"pattern": pattern, "queue": queue or None, "peer": peer})
    return sorted(rows, key=lambda r: (r["pattern"], r["queue"] or "", r["peer"]))


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
