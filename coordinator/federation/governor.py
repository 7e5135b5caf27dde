"""One cluster, not islands: the active bridge's part in the namespace's cluster-wide state.

About once a second it puts the site's record in the namespace's key-value bucket, takes part in
choosing the namespace's one leader there and records it here (both in
:mod:`coordinator.federation.directory`), and mirrors every site's record into the ``sites`` hash,
which ``sidecar status``, ``sidecar peers`` and the dashboard read. A leader on this site that
cannot be confirmed on NATS is fenced here before another site may take over.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from redis.exceptions import RedisError

from coordinator.aio import reap
from coordinator.cluster.membership import elect_call
from coordinator.federation.active import Deposed
from coordinator.federation.directory import (
    ClusterElection,
    Directory,
    LeaderRecord,
    SiteView,
    parse_site,
)
from coordinator.keys import Keys
from coordinator.protocol import BRIDGE_ROLE
from coordinator.scripts import Scripts
from coordinator.settings import Settings

__all__ = ["Governor"]

log = logging.getLogger("sidecar.bridge")


class Governor:
    """The cluster-wide rounds of one bridge of ``site``; lives as long as the bridge (the term
    seen and the leader held outlive a lost NATS connection)."""

    def __init__(self, settings: Settings, *, site: str, name: str, token: str, redis: Any,
                 scripts: Scripts) -> None:
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self.site = site
        self.name = name
        self.token = token
        self.redis = redis
        self.scripts = scripts
        self.term_seen = 0
        """The highest cluster leader term this bridge has seen."""
        self._leading: LeaderRecord | None = None
        """The namespace's leader while it is on this site (see fence_unconfirmed)."""
        self._confirmed_at = 0.0

    def reset(self) -> None:
        """The bridge is no longer active: it holds no leader here any more."""
        self._leading = None

    async def run(self, js: Any) -> None:
        """Announce this site, keep the namespace's one leader, mirror the sites; every round,
        until cancelled (or :class:`Deposed`)."""
        directory = Directory(js, self.keys, replicas=self.settings.nats_stream_replicas)
        await directory.open()
        # terms never go back, across this bridge's restarts and takeovers too
        self.term_seen = max(self.term_seen, int(await self.redis.hget(self.keys.leader, "term") or 0))
        election = ClusterElection(directory, self.site, self.settings.member_ttl, term=self.term_seen)
        period = self.settings.bridge_lease / 3
        following = asyncio.create_task(directory.follow(), name="bridge directory")
        try:
            while True:
                try:
                    await directory.announce(self.site, await self._site_record())
                    leader = await election.step(self._candidate)
                    self.term_seen = election.term
                    self._leading = leader if leader.id and leader.site == self.site else None
                    self._confirmed_at = election.confirmed_at
                    await self._adopt(leader, election.hold)
                    await self._mirror(directory.sites(self.site,
                                                       silent_after=self.settings.member_ttl))
                except Deposed:
                    raise
                except Exception as exc:  # NATS away: fence_unconfirmed acts after the hold
                    log.debug("bridge %s: cluster round failed: %r", self.name, exc)
                    await self.unheard()
                await asyncio.sleep(period)
        finally:
            await reap(following)

    async def fence_unconfirmed(self) -> None:
        """This site's leader could not be confirmed on NATS for the hold (half a member TTL):
        record no leader here, so its fenced publishes are refused and peers learn it, before
        another site may take over (a member TTL after the last confirmation)."""
        leading = self._leading
        if leading is None or time.monotonic() - self._confirmed_at <= self.settings.member_ttl / 2:
            return
        self._leading = None
        await self._adopt(LeaderRecord("", self.site, leading.term), self.settings.member_ttl / 2)
        log.warning("bridge %s: leader %s could not be confirmed on NATS; fenced here", self.name,
                    leading.id)

    async def unheard(self) -> None:
        """This bridge hears no other site (NATS is out of reach): the ``sites`` hash says so."""
        with contextlib.suppress(RedisError, OSError):
            views = await self.redis.hgetall(self.keys.sites)
            pipe = self.redis.pipeline(transaction=False)
            for name, text in views.items():
                record = parse_site(text)
                if name != self.site and record["reachable"]:
                    pipe.hset(self.keys.sites, name, json.dumps({**json.loads(text),
                                                                 "reachable": False}))
            await pipe.execute()

    async def _site_record(self) -> dict[str, Any]:
        members = await self.redis.zrange(self.keys.members, 0, -1)
        pipe = self.redis.pipeline(transaction=False)
        for member in members:
            pipe.hget(self.keys.member(member), "role")
        pipe.hget(self.keys.leader, "id")
        *roles, leader = await pipe.execute()
        return {"site": self.site, "bridge": self.name, "leader": leader or None,
                "members": {m: r or "peer" for m, r in zip(members, roles, strict=True)
                            if r != BRIDGE_ROLE},
                "at": round(time.time(), 3)}

    async def _candidate(self, keep: str) -> str:
        keys, args = elect_call(self.keys, self.settings.member_ttl, "", mode="candidate",
                                extra=(keep,))
        return str((await self.scripts.elect(keys=keys, args=args))[1] or "")

    async def _adopt(self, leader: LeaderRecord, hold: float) -> None:
        """Record ``leader`` here (announced to peers if it changed) for ``hold`` seconds."""
        reason = f"cluster leader on site {leader.site}" if leader.id else "no cluster leader"
        keys, args = elect_call(self.keys, self.settings.member_ttl, reason, mode="adopt",
                                extra=(leader.id, leader.term, max(1, int(hold * 1000)), self.token))
        if str((await self.scripts.elect(keys=keys, args=args))[0]) == "fenced":
            raise Deposed

    async def _mirror(self, views: list[SiteView]) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.keys.sites)
        for view in views:
            pipe.hset(self.keys.sites, view.site, json.dumps({**view.record,
                                                              "reachable": view.reachable}))
        await pipe.execute()
