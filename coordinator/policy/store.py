"""Versioned policy store, distribution to peers, and per-peer acknowledgement state.

Every change of any document increments the policy set's version. Distribution delivers the whole
set (version, nonce, documents) as a ``cluster.policy`` message straight into each live peer's
inbox that has not acknowledged that version, retrying stale peers with exponential backoff. Peers
acknowledge (or refuse, with the error) through the request stream; the router records it here.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from coordinator.clock import time_reply_ms
from coordinator.errors import InvalidPolicy
from coordinator.keys import REQUEST_GROUP, Keys
from coordinator.policy.engine import Policy, PolicyEngine, parse_policy
from coordinator.protocol import SYSTEM_SENDER, dumps
from coordinator.scripts import scripts_for

log = logging.getLogger("sidecar.policy")

__all__ = ["PolicyStore", "policy_ack_call"]

_MAX_BACKOFF_MS = 30_000
_FIRST_RETRY_MS = 500


def policy_ack_call(keys: Keys, peer: str, version: int, nonce: str, ok: bool, error: str, *,
                    stream: str = "", entry_id: str = "") -> tuple[list[str], list[Any]]:
    """Arguments of policy_ack.lua: ``peer`` applied (``ok``) or refused ``version``; the router
    passes the request ``stream`` and ``entry_id`` so the entry is acknowledged in the same step."""
    return ([keys.policy_acks, stream or keys.requests(0)],
            [peer, version, nonce, "1" if ok else "0", error[:1000], REQUEST_GROUP, entry_id])


class PolicyStore:
    """Policy documents of one namespace on a sync client."""

    def __init__(self, client: Any, keys: Keys, *, inbox_maxlen: int = 100_000) -> None:
        self.client = client
        self.keys = keys
        self.inbox_maxlen = inbox_maxlen
        self.scripts = scripts_for(client)

    # ------------------------------------------------------------------ documents
    def set(self, name: str, document: Any, *, by: str = "cli", action: str = "set") -> int:
        """Validate and store ``document`` under ``name``; returns the new policy set version."""
        policy = parse_policy(document, name=name)
        return int(self.scripts.policy_set(
            keys=[self.keys.policy_docs, self.keys.policy_version, self.keys.policy_history(name),
                  self.keys.routing_version],
            args=[name, dumps(policy.document), by, action]))

    def get(self, name: str) -> dict[str, Any] | None:
        """The current record of ``name`` (version, set_by, set_at, document), or None."""
        raw = self.client.hget(self.keys.policy_docs, name)
        return None if raw is None else dict(json.loads(raw))

    def documents(self) -> dict[str, dict[str, Any]]:
        """Every current record by name."""
        return {str(k): json.loads(v) for k, v in self.client.hgetall(self.keys.policy_docs).items()}

    def history(self, name: str) -> list[dict[str, Any]]:
        """Every version ``name`` had, oldest first."""
        return [json.loads(r) for r in self.client.lrange(self.keys.policy_history(name), 0, -1)]

    def rollback(self, name: str, version: int, *, by: str = "cli") -> int:
        """Make the document ``name`` had at ``version`` current again (as a new version)."""
        for record in self.history(name):
            if int(record["version"]) == version:
                return self.set(name, record["document"], by=by, action=f"rollback to {version}")
        raise InvalidPolicy(f"policy {name!r} never had version {version}; see `sidecar policy history`")

    def version(self) -> int:
        return int(self.client.get(self.keys.policy_version) or 0)

    def policies(self) -> list[Policy]:
        """The documents in force, parsed."""
        return [parse_policy(r["document"], name=n) for n, r in sorted(self.documents().items())]

    def engine(self) -> PolicyEngine:
        return PolicyEngine(self.policies())

    # ------------------------------------------------------------------ distribution
    def policy_set(self) -> dict[str, Any]:
        """What peers receive: {version, policies: {name: document}}."""
        pipe = self.client.pipeline(transaction=True)
        pipe.get(self.keys.policy_version)
        pipe.hgetall(self.keys.policy_docs)
        version, docs = pipe.execute()
        return {"version": int(version or 0),
                "policies": {str(n): json.loads(r)["document"] for n, r in sorted(docs.items())}}

    def distribute(self, peers: list[str] | None = None, *, force: bool = False) -> int:
        """Send the set to every live peer (or ``peers``) not yet on its version; returns sends."""
        current = self.policy_set()
        version = current["version"]
        if version == 0:
            return 0
        pipe = self.client.pipeline(transaction=False)
        pipe.time()
        pipe.zrange(self.keys.members, 0, -1)
        pipe.hgetall(self.keys.policy_acks)
        pipe.hgetall(self.keys.policy_sent)
        clock, members, acks, sent = pipe.execute()
        now = time_reply_ms(clock)
        targets = [p for p in (peers if peers is not None else members) if p in set(members)]
        out = self.client.pipeline(transaction=False)
        sends = first = 0
        for peer in targets:
            ack = json.loads(acks[peer]) if peer in acks else {}
            if ack.get("version") == version and ack.get("ok"):
                continue
            state = json.loads(sent[peer]) if peer in sent else {}
            same = state.get("version") == version
            if same and not force and now < int(state.get("next_at", 0)):
                continue
            attempts = int(state.get("attempts", 0)) + 1 if same else 1
            first += attempts == 1
            nonce = uuid.uuid4().hex[:12]
            body = dumps({"version": version, "nonce": nonce, "policies": current["policies"]})
            out.xadd(self.keys.responses(peer), {"k": "msg", "i": f"policy:{version}:{nonce}",
                                                 "t": "cluster.policy", "d": body, "s": SYSTEM_SENDER,
                                                 "ts": str(now)},
                     maxlen=self.inbox_maxlen, approximate=True)
            delay = min(_MAX_BACKOFF_MS, _FIRST_RETRY_MS * 2 ** (attempts - 1))
            out.hset(self.keys.policy_sent, peer, dumps(
                {"version": version, "nonce": nonce, "attempts": attempts, "sent_at": now,
                 "next_at": now + delay}))
            sends += 1
        if sends:
            out.execute()
        # news once per peer and version: the count of attempts lives in Redis, so processes that
        # distribute one after another say it once (two at the same instant may both send and
        # say it: the peer ignores a set it has); resends are not news
        if first:
            log.info("sending policy version %d to %d peer(s) for the first time", version, first)
        elif sends:
            log.debug("policy version %d sent again to %d peer(s)", version, sends)
        return sends

    def record_ack(self, peer: str, version: int, nonce: str, ok: bool, error: str, *,
                   stream: str = "", entry_id: str = "") -> bool:
        """Remember what ``peer`` did with ``version``, unless a newer answer is known.

        The router passes the request ``stream`` and ``entry_id`` so the ack of the entry happens
        in the same atomic step. Returns False if a newer version was already recorded.
        """
        keys, args = policy_ack_call(self.keys, peer, version, nonce, ok, error, stream=stream,
                                     entry_id=entry_id)
        return bool(self.scripts.policy_ack(keys=keys, args=args))

    def status(self) -> list[dict[str, Any]]:
        """Each live peer: SYNCED, STALE or NACKED (NONE while no policy is set), with version,
        error and when."""
        version = self.version()
        members = self.client.zrange(self.keys.members, 0, -1)
        acks = self.client.hgetall(self.keys.policy_acks)
        rows = []
        for peer in members:
            ack = json.loads(acks[peer]) if peer in acks else {}
            if not version:
                state = "NONE"  # no policy set yet: nothing to be in sync with
            elif ack.get("version") == version and ack.get("ok"):
                state = "SYNCED"
            elif ack.get("version") == version:
                state = "NACKED"
            else:
                state = "STALE"
            rows.append({"peer_id": peer, "state": state, "applied": ack.get("version") if
                         ack.get("ok") else None, "acked_version": ack.get("version"),
                         "nonce": ack.get("nonce"), "error": ack.get("error") or None,
                         "at": ack.get("at"), "current": version})
        return rows
