"""The sidecar's periodic duties as plain methods: beat schedules them, tests call them directly.

Every duty is idempotent: running it twice, late, or from two beats at once changes nothing more
than running it once. Beat runs them several times a second, so they log at INFO only when
something changed (a member evicted, the leader changed or went, a new policy version sent, a
member slow or recovered, inboxes of long-gone peers deleted) and at DEBUG otherwise.
"""

from __future__ import annotations

import logging
from typing import Any

from coordinator.clock import redis_ms
from coordinator.cluster.election import Election
from coordinator.cluster.membership import Membership
from coordinator.keys import PEER_GROUP, Keys
from coordinator.policy.store import PolicyStore
from coordinator.protocol import BRIDGE_ROLE, SYSTEM_SENDER, dumps
from coordinator.scripts import scripts_for
from coordinator.settings import Settings

__all__ = ["Duties"]

log = logging.getLogger("sidecar.duties")


class Duties:
    """Sweep, trim and the other periodic duties of one namespace, on a sync Redis client."""

    def __init__(self, client: Any, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self.membership = Membership(client, self.keys, inbox_maxlen=settings.inbox_maxlen)
        self.election = Election(client, self.keys, settings.member_ttl)
        self.policies = PolicyStore(client, self.keys, inbox_maxlen=settings.inbox_maxlen)

    def sweep(self) -> list[str]:
        """Evict members silent for longer than the member TTL (announces cluster.member.left)."""
        evicted = self.membership.sweep(self.settings.member_ttl)
        for peer in evicted:
            log.info("evicted %s: silent for more than %.1fs", peer, self.settings.member_ttl)
        if evicted:
            self.elect("expired")
        else:
            log.debug("sweep: no member silent for more than %.1fs", self.settings.member_ttl)
        return evicted

    def evict(self, peer_id: str) -> bool:
        """Remove ``peer_id`` now (operator action); True if it was a member."""
        left = self.membership.leave(peer_id, "evicted")
        if left:
            log.info("evicted %s on request", peer_id)
            self.elect("evicted")
        else:
            log.info("evict %s: not a member", peer_id)
        return left

    def elect(self, reason: str = "periodic") -> dict[str, Any]:
        """Keep or change the leader (see coordinator.cluster.election). With federation on,
        the site's bridge keeps the namespace's one leader instead (coordinator.federation)."""
        if self.settings.nats_url:
            leader, term = self.election.leader()
            return {"status": "federated", "leader_id": leader, "term": term}
        status, leader, term = self.election.run(reason)
        if status == "elected":
            log.info("leader is now %s (term %d, %s)", leader, term, reason)
        elif status == "vacated":  # one call in the namespace gets it (elect.lua): said once
            log.info("no leader: the leader is gone and no eligible member is live (term %d, %s)",
                     term, reason)
        else:
            log.debug("election: %s %s (term %d)", status, leader or "-", term)
        return {"status": status, "leader_id": leader, "term": term}

    def distribute_policies(self) -> int:
        """Send the policy set to live peers that have not acknowledged its version (with backoff)."""
        return self.policies.distribute()  # logs a version's first send to each peer at INFO

    def cluster_heartbeat(self) -> dict[str, Any]:
        """Publish ``cluster.heartbeat`` (size, leader, term, policy version) to its subscribers."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zcard(self.keys.members)
        pipe.hmget(self.keys.leader, "id", "term")
        pipe.get(self.keys.policy_version)
        size, (leader, term), policy = pipe.execute()
        beat = {"cluster_size": int(size), "leader_id": leader or None, "term": int(term or 0),
                "policy_version": int(policy or 0)}
        self.client.xadd(self.keys.system, {"k": "pub", "t": "cluster.heartbeat", "d": dumps(beat),
                                            "s": SYSTEM_SENDER}, maxlen=100_000, approximate=True)
        log.debug("cluster heartbeat: %s", beat)
        return beat

    def watch_inboxes(self) -> list[str]:
        """Emit ``cluster.member.slow`` once per episode for each member whose inbox lags.

        A member is slow while its inbox holds more than ``slow_consumer_lag`` entries it has not
        read (its group's lag, which Redis reports from 7.0 on; before that nobody is flagged); the
        episode ends when the lag falls below half of that. Returns the members that became slow.
        """
        members = [str(m) for m in self.client.zrange(self.keys.members, 0, -1)]
        if not members:
            return []
        pipe = self.client.pipeline(transaction=False)
        for peer in members:
            pipe.xinfo_groups(self.keys.responses(peer))
        pipe.smembers(self.keys.slow)
        *infos, slow = pipe.execute(raise_on_error=False)
        slow = set() if isinstance(slow, Exception) else {str(s) for s in slow}
        limit = self.settings.slow_consumer_lag
        became, recovered = [], []
        for peer, info in zip(members, infos, strict=True):
            lag = _lag(info)
            if lag is None:
                continue
            if lag > limit and peer not in slow:
                became.append((peer, lag))
            elif lag < limit / 2 and peer in slow:
                recovered.append(peer)
        gone = slow - set(members)
        pipe = self.client.pipeline(transaction=True)
        for peer, lag in became:
            pipe.sadd(self.keys.slow, peer)
            pipe.xadd(self.keys.system, {"k": "pub", "t": "cluster.member.slow", "s": SYSTEM_SENDER,
                                         "d": dumps({"peer_id": peer, "lag": lag, "limit": limit})},
                      maxlen=100_000, approximate=True)
        if recovered or gone:
            pipe.srem(self.keys.slow, *recovered, *gone)
        pipe.execute()
        for peer, lag in became:
            log.warning("member %s is slow: %d unread entries in its inbox (limit %d)", peer, lag, limit)
        for peer in recovered:
            log.info("member %s caught up with its inbox", peer)
        return [peer for peer, _ in became]

    def trim(self) -> dict[str, int]:
        """Trim inboxes to ``inbox_max_age`` (but a site's bridge's: what waits there to leave
        the site is bounded by ``bridge_backlog`` with dead letters while a bridge runs, and by
        the inbox MAXLEN while none does) and delete those of long-gone peers.

        A peer is long gone when it is not a member, its inbox is empty with nothing pending, and
        its reader has taken nothing from it for ``inbox_max_age`` (an inbox never read is kept:
        its peer may be registering right now). ``drop_inbox.lua`` checks and deletes in one
        step, so a peer registering meanwhile never loses the reply written to it. Before Redis
        7.2 a reader's idle time counts only reads that returned entries, so the empty inbox of a
        peer evicted after a long quiet spell may go while it rejoins; its reader makes it again.
        """
        now_ms = redis_ms(self.client)
        age_ms = int(self.settings.inbox_max_age * 1000)
        floor = now_ms - age_ms
        members = set(self.client.zrange(self.keys.members, 0, -1))
        trimmed = deleted = 0
        prefix = self.keys.responses_prefix
        scripts = scripts_for(self.client)
        bridges = self._bridges(members)
        for key in self.client.scan_iter(match=_glob_escape(prefix) + "*", count=500, _type="stream"):
            peer = str(key)[len(prefix):]
            if peer in bridges:
                continue  # what waits to leave the site: its bridge bounds it, with dead letters
            trimmed += int(self.client.xtrim(key, minid=f"{floor}-0", approximate=False))
            if peer not in members:
                deleted += int(scripts.drop_inbox(keys=[key, self.keys.members, self.keys.publish_last],
                                                  args=[peer, PEER_GROUP, age_ms, floor]))
        if deleted:
            log.info("deleted the inboxes of %d long-gone peer(s)", deleted)
        log.debug("trim: %d inbox entries older than %.0fs trimmed", trimmed, self.settings.inbox_max_age)
        return {"trimmed": trimmed, "deleted": deleted}

    def _bridges(self, members: set[str]) -> set[str]:
        """The members among ``members`` that are a site's NATS bridge."""
        ordered = sorted(members)
        pipe = self.client.pipeline(transaction=False)
        for member in ordered:
            pipe.hget(self.keys.member(member), "role")
        return {m for m, role in zip(ordered, pipe.execute(), strict=True) if role == BRIDGE_ROLE}


def _lag(info: Any) -> int | None:
    """Unread entries of the peers' group from an XINFO GROUPS reply (None: no inbox or group)."""
    if isinstance(info, Exception):
        return None
    for group in info or ():
        if group.get("name") == PEER_GROUP:
            lag = group.get("lag")  # None before Redis 7.0, or when Redis cannot compute it
            return None if lag is None else int(lag)
    return None


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)
