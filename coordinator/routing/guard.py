"""The router's gate: who sent a request (authentication) and whether policy allows it.

Both checks are off unless configured (``Settings.auth``, ``Settings.enforce_policy``). The state
they need (identities, member roles, the policy engine) is reloaded whenever the routing version
moves, which every identity, membership and policy change bumps.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from coordinator.errors import AuthenticationFailed, PolicyRejected
from coordinator.keys import Keys
from coordinator.policy.auth import Identities, Identity, verify
from coordinator.policy.engine import PolicyEngine
from coordinator.policy.store import PolicyStore
from coordinator.protocol import INTERNAL_SUBSCRIPTIONS
from coordinator.scripts import scripts_for
from coordinator.settings import Settings

__all__ = ["Guard", "Mark"]

Mark = tuple[int, str]
"""(nonce, request entry id) of a sender's last accepted signed request."""

_RELOAD_EVERY = 1.0
"""Least seconds between two reloads of the identities for senders not among them (a new
identity also bumps the routing version, which reloads them with everything else)."""



class Guard:
    """Authentication and policy enforcement state of one router."""

    def __init__(self, client: Any, keys: Keys, settings: Settings) -> None:
        self.client = client
        self.keys = keys
        self.auth = settings.auth == "required"
        self.enforce = settings.enforce_policy
        self.store = PolicyStore(client, keys, inbox_maxlen=settings.inbox_maxlen)
        self._identities = Identities(client, keys, settings.peer_key)
        if self.auth:
            self._identities.require_key()  # at once, not on the first request
        self.identities: dict[str, Identity] = {}
        self.marks: dict[str, Mark] = {}
        """Per sender, the (nonce, entry id) of its last accepted signed request, as last read from
        or written to Redis; dropped after a takeover or a Redis error (see forget_marks)."""
        self.scripts = scripts_for(client)
        self.roles: dict[str, frozenset[str]] = {}
        self.labels: dict[str, Mapping[str, str]] = {}
        self.engine = PolicyEngine()
        self._policy_version = -1
        self._missed_at = float("-inf")
        """When an unknown sender last made the identities reload."""

    @property
    def active(self) -> bool:
        return self.auth or self.enforce

    @property
    def policy_version(self) -> int:
        """The version of the policies enforced now (-1: none loaded)."""
        return self._policy_version

    def refresh(self, members: set[str]) -> None:
        """Reload identities, roles and (when its version moved) the policy engine."""
        if not self.active:
            return
        if self.auth:
            self._load_identities()
        if self.enforce:
            version = self.store.version()
            if version != self._policy_version:
                self.engine = self.store.engine()
                self._policy_version = version
            pipe = self.client.pipeline(transaction=False)
            ordered = sorted(members)
            for peer in ordered:
                pipe.hmget(self.keys.member(peer), "roles", "labels")
            self.roles.clear()
            self.labels.clear()
            for peer, (roles, labels) in zip(ordered, pipe.execute(), strict=True):
                self.learn(peer, _json(roles, []), _json(labels, {}))

    def _load_identities(self) -> None:
        self.identities = self._identities.load()

    def member_info(self, peer: str, claimed: dict[str, Any]) -> dict[str, Any]:
        """What a register request of ``peer`` records: with authentication on, its identity's
        roles, labels, leader priority and eligibility replace whatever the peer claimed."""
        ident = self.identities.get(peer) if self.auth else None
        return ident.member_info(claimed) if ident is not None else claimed

    def learn(self, peer: str, roles: Any, labels: Any) -> None:
        """Record a member's roles and labels (the identity's when authentication is on)."""
        ident = self.identities.get(peer)
        if self.auth and ident is not None:
            self.roles[peer] = frozenset(ident.roles)
            self.labels[peer] = dict(ident.labels)
            return
        self.roles[peer] = frozenset(str(r) for r in roles) if isinstance(roles, list) else frozenset()
        self.labels[peer] = {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}

    def authenticate(self, fields: Mapping[str, str], entry_id: str,
                     chain: dict[str, Mark] | None = None) -> Mark | None:
        """Raise AuthenticationFailed unless the entry is signed by its sender, fresh and new.

        New means its nonce exceeds the sender's mark: the last signed request accepted from it,
        kept in Redis (``nonces``) so a router taking over knows it too. ``chain`` holds the marks
        of entries accepted earlier in the same run and not yet committed; this entry's mark is
        added to it. Returns the entry's mark (None when authentication is off).
        """
        if not self.auth:
            return None
        sender = fields.get("s", "")
        if sender not in self.identities and time.monotonic() - self._missed_at > _RELOAD_EVERY:
            # maybe created since the last reload; reloaded for an unknown sender at most once a
            # second, so a flood of entries from made-up senders costs no reload each
            self._missed_at = time.monotonic()
            self._load_identities()
        entry_ms = int(entry_id.partition("-")[0])
        last = (chain.get(sender) if chain else None) or self._mark(sender)
        # the very entry a mark was taken from is being processed again (its router died between
        # storing the mark and acknowledging the entry): that is not a replay
        floor = last[0] - 1 if last[1] == entry_id else last[0]
        mark = (verify(self.identities.get(sender), fields, entry_ms, floor), entry_id)
        if chain is not None:
            chain[sender] = mark
        return mark

    def commit(self, marks: Mapping[str, Mark]) -> None:
        """Remember marks that Redis now holds (route.lua stored them with the fan-out)."""
        for sender, mark in marks.items():
            if mark[0] > self._mark(sender)[0]:
                self.marks[sender] = mark

    def store_mark(self, sender: str, mark: Mark, lease_key: str, token: str) -> bool:
        """Store ``sender``'s mark in Redis now, before the request it came from takes effect.

        Fenced by the partition lease (``mark.lua``); a stored mark only ever rises. Returns False
        when the lease is not ``token``'s any more (nothing written); raises AuthenticationFailed
        when Redis already holds another entry's mark as high (a replay our cache did not know).
        """
        stored = int(self.scripts.mark(keys=[lease_key, self.keys.nonces],
                                       args=[token, sender, mark[0], mark[1]]))
        if stored < 0:
            return False
        if stored == 0:
            self.marks.pop(sender, None)  # read Redis's when next needed
            raise AuthenticationFailed(f"replayed request from {sender!r} (nonce did not grow)")
        self.marks[sender] = mark
        return True

    def forget_marks(self) -> None:
        """Drop cached marks (another router may have moved them while we did not route)."""
        self.marks.clear()

    def _mark(self, sender: str) -> Mark:
        mark = self.marks.get(sender)
        if mark is None:
            mark = self.marks[sender] = _parse_mark(self.client.hget(self.keys.nonces, sender))
        return mark

    def authorize(self, sender: str, action: str, resource: str) -> None:
        """Raise PolicyRejected unless the policies allow ``sender`` to ``action`` ``resource``."""
        if not self.enforce or (action == "subscribe" and resource in INTERNAL_SUBSCRIPTIONS):
            return
        decision = self.engine.evaluate(self.roles.get(sender, frozenset()), action, resource,
                                        self.labels.get(sender))
        if not decision.allowed:
            raise PolicyRejected(f"{action} {resource!r} by {sender}: {decision.reason}")


def _parse_mark(raw: str | None) -> Mark:
    """A stored mark; anything unreadable counts as no mark (nonce 0)."""
    nonce, _, entry_id = (raw or "").partition(" ")
    try:
        return int(nonce), entry_id
    except ValueError:
        return 0, ""


def _json(raw: str | None, default: Any) -> Any:
    if not raw:
        return default
    try:
        return json.loads(raw)
    except ValueError:
        return default
