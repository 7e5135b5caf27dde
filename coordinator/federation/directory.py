"""One cluster across sites: the namespace's key-value bucket on NATS, and the leader chosen in it.

The bucket (``sidecar_<namespace>``, JetStream key-value) holds:

- ``site.<site>``: each site's record, put by its active bridge about once a second: its members
  (id -> role), its bridge, the leader it runs under;
- ``leader``: the namespace's leader across all sites: ``{"id", "site", "term"}``.

:class:`ClusterElection` keeps one leader for the whole namespace. The record is changed only by a
compare-and-set on its revision (``update(..., last=revision)``), which JetStream guarantees, so two
sites can never both win, and every change of leader raises the term by one. The leader's site
re-puts the record on every round (a revision that moves is the leader's heartbeat). Another site
puts its own candidate forward only after seeing the revision stand still for a member TTL by its
own clock, and the leader's site stops counting on the record half a member TTL after its last
successful put: a site cut off from NATS fences its leader (``elect.lua`` 'adopt' records the
leader with that expiry, and fenced publishes are refused without it) before any other site may
take over. No site's clock is compared with another's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from coordinator.keys import Keys

__all__ = ["ClusterElection", "Directory", "LeaderRecord", "SiteView", "parse_site"]

_LEADER = "leader"


@dataclass(frozen=True, slots=True)
class LeaderRecord:
    """The namespace's leader as the bucket holds it."""

    id: str
    site: str
    term: int

    def encode(self) -> bytes:
        return json.dumps({"id": self.id, "site": self.site, "term": self.term}).encode()

    @classmethod
    def decode(cls, raw: bytes | None) -> LeaderRecord | None:
        try:
            value = json.loads(raw or b"")
            return cls(str(value["id"]), str(value["site"]), int(value["term"]))
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True, slots=True)
class SiteView:
    """A site as this bridge sees it: its record and whether it still announces itself."""

    site: str
    record: dict[str, Any]
    reachable: bool


def parse_site(text: str | None) -> dict[str, Any]:
    """A site's record as a bridge mirrors it into the ``sites`` hash: members (id -> role), the
    leader it runs under, its active bridge, and whether this site's bridge still hears it."""
    try:
        record = json.loads(text or "")
    except ValueError:
        record = {}
    if not isinstance(record, dict):
        record = {}
    members = record.get("members")
    return {"members": dict(members) if isinstance(members, dict) else {},
            "leader": record.get("leader") or None, "bridge": record.get("bridge"),
            "reachable": bool(record.get("reachable"))}


class Directory:
    """The namespace's bucket, through one JetStream context."""

    def __init__(self, js: Any, keys: Keys, *, replicas: int = 1) -> None:
        self.js = js
        self.bucket = keys.bucket
        self.replicas = replicas
        self.kv: Any = None
        self._records: dict[str, tuple[dict[str, Any], float]] = {}
        """Site -> its last record and when it came (this process's monotonic clock)."""

    async def open(self) -> None:
        """Bind the bucket, creating it the first time."""
        from nats.js.errors import BucketNotFoundError

        try:
            self.kv = await self.js.key_value(self.bucket)
        except BucketNotFoundError:
            self.kv = await self.js.create_key_value(bucket=self.bucket, history=1,
                                                     replicas=self.replicas)

    async def announce(self, site: str, record: dict[str, Any]) -> None:
        """Put ``site``'s record."""
        await self.kv.put(f"site.{site}", json.dumps(record).encode())

    async def follow(self) -> None:
        """Keep every site's record as the bucket changes (a watch: no polling), until cancelled."""
        watcher = await self.kv.watch("site.*")
        try:
            async for entry in watcher:
                if entry is None:  # the end of the records there were when the watch began
                    continue
                site = str(entry.key)[len("site."):]
                try:
                    record = json.loads(entry.value or b"{}")
                except ValueError:
                    record = {}
                if entry.operation in ("DEL", "PURGE"):
                    self._records.pop(site, None)
                else:
                    self._records[site] = (record if isinstance(record, dict) else {},
                                           time.monotonic())
        finally:
            await watcher.stop()

    def sites(self, own: str, silent_after: float) -> list[SiteView]:
        """Every site's record; another site is reachable while its record keeps changing
        (within ``silent_after`` seconds of this process's clock), site ``own`` always (its
        bridge writes this view only while it reaches NATS)."""
        now = time.monotonic()
        return [SiteView(site, record, site == own or now - seen < silent_after)
                for site, (record, seen) in sorted(self._records.items())]

    async def leader(self) -> tuple[LeaderRecord | None, int]:
        """The leader record and its revision (0: there never was one). A deleted or purged
        record reads as none, at the revision of its deletion (what a claim must name)."""
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await self.kv.get(_LEADER)
        except KeyNotFoundError as exc:  # (nats-py reports a deleted key as not found, too)
            deleted = getattr(exc, "entry", None)
            return None, int(getattr(deleted, "revision", 0) or 0)
        return LeaderRecord.decode(entry.value), int(entry.revision or 0)

    async def claim(self, record: LeaderRecord, revision: int) -> int | None:
        """Put ``record`` if the leader record is still at ``revision`` (0: there is none);
        returns the new revision, or None when another site changed it first."""
        from nats.js.errors import KeyWrongLastSequenceError

        try:
            return int(await self.kv.update(_LEADER, record.encode(), last=revision))
        except KeyWrongLastSequenceError:
            return None


class ClusterElection:
    """One site's part in choosing the namespace's leader (see the module docstring)."""

    def __init__(self, directory: Directory, site: str, member_ttl: float, *, term: int = 0) -> None:
        self.directory = directory
        self.site = site
        self.member_ttl = member_ttl
        self._revision = -1
        self._moved_at = 0.0
        self._term = term
        """The highest term this site has seen: a record deleted from the bucket (or written
        with a lower term) never makes a term go back."""
        self.confirmed_at = 0.0
        """When this site last put the record as the leader's site (monotonic; 0: never)."""

    @property
    def term(self) -> int:
        """The highest term this site has seen (pass it to the next election of this site)."""
        return self._term

    @property
    def hold(self) -> float:
        """How long this site counts on the record after putting it: half a member TTL."""
        return self.member_ttl / 2

    async def step(self, candidate: Callable[[str], Awaitable[str]]) -> LeaderRecord:
        """One round: returns the leader this site runs under now (id '' for none).

        ``candidate(keep)`` names who this site puts forward: ``keep`` while it is a live,
        eligible member here, else the first live eligible member ('' for none).
        """
        record, revision = await self.directory.leader()
        now = time.monotonic()
        if revision != self._revision:
            self._revision, self._moved_at = revision, now
        term = self._term = max(self._term, record.term if record else 0)
        if record is not None and record.site == self.site:
            chosen = await candidate(record.id)
            if not chosen:  # our leader is gone and nobody here can follow: let it lapse
                return LeaderRecord("", self.site, term)
            proposal = (record if chosen == record.id and record.term == term
                        else LeaderRecord(chosen, self.site, term + 1))
            return await self._claim(proposal, revision, now, record)
        if record is not None and now - self._moved_at < self.member_ttl:
            return record  # another site leads, and its record still moves
        chosen = await candidate("")
        if not chosen:
            return LeaderRecord("", record.site if record else "", term)
        return await self._claim(LeaderRecord(chosen, self.site, term + 1), revision, now, record)

    async def _claim(self, proposal: LeaderRecord, revision: int, now: float,
                     record: LeaderRecord | None) -> LeaderRecord:
        won = await self.directory.claim(proposal, revision)
        if won is None:  # another site changed it first: follow what it put
            record, revision = await self.directory.leader()
            self._revision, self._moved_at = revision, now
            if record is not None:
                self._term = max(self._term, record.term)
            return record or LeaderRecord("", "", self._term)
        self._revision, self._moved_at, self.confirmed_at = won, now, now
        self._term = max(self._term, proposal.term)
        return proposal
