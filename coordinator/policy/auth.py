"""Request authentication: per-peer identities with secrets, HMAC-signed request entries.

With ``SIDECAR_AUTH=required`` every request entry carries ``n`` (a nonce: the signer's clock in
microseconds, raised by one whenever that would not make it grow, so it grows with every request of
the peer) and ``sig`` (HMAC-SHA256 over every other field, truncated to 128 bits as RFC 4868 does).
The router checks the signature with the claimed sender's secret, that the nonce's time is within
:data:`FRESHNESS_MS` of the entry's Redis-assigned id (so a copied entry written again later is
stale) and that the nonce grew (so a copy written again at once is a replay). The last nonce
accepted from each sender is stored in Redis with the work it allowed (see coordinator.routing.guard), so a
router taking a partition over refuses replays of what its predecessor accepted.

Identities live in Redis (``identities`` hash) where routers can read them; with per-peer Redis ACL
users (``sidecar peer add --redis-acl``) a peer cannot read them, nor any stream but its own inbox.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ResponseError
from ulid import ULID

from coordinator.errors import AuthenticationFailed
from coordinator.keys import Keys
from coordinator.protocol import dumps

__all__ = ["FRESHNESS_MS", "TAG_HEX", "Identities", "Identity", "Signer", "canonical", "tag", "verify"]

FRESHNESS_MS = 30_000
TAG_HEX = 32
"""Hex digits of the signature kept: 128 bits of HMAC-SHA256."""


def canonical(fields: Mapping[str, str]) -> bytes:
    """Length-prefixed encoding of every field but the signature, in key order."""
    return "".join(f"{len(k)}:{k}{len(v)}:{v}" for k, v in sorted(fields.items())
                   if k != "sig").encode()


def _mac(key: bytes) -> Any:
    """An HMAC-SHA256 keyed once; ``.copy()`` it per message (skips re-deriving the key pads)."""
    return hmac.new(key, digestmod=hashlib.sha256)


def tag(mac: Any, fields: Mapping[str, str]) -> str:
    """The signature of ``fields`` under ``mac`` (a keyed prototype from the secret)."""
    h = mac.copy()
    h.update(canonical(fields))
    return str(h.hexdigest()[:TAG_HEX])


class Signer:
    """Signs a peer's request entries with its secret."""

    def __init__(self, secret: str) -> None:
        self._mac = _mac(secret.encode())
        self._last = 0

    def sign(self, fields: dict[str, str]) -> dict[str, str]:
        """Add the nonce ``n`` and the signature ``sig`` to ``fields`` (in place) and return them."""
        self._last = max(self._last + 1, time.time_ns() // 1000)
        fields["n"] = str(self._last)
        fields["sig"] = tag(self._mac, fields)
        return fields

    def __repr__(self) -> str:
        return "Signer(secret=***)"


@dataclass(frozen=True)
class Identity:
    """A peer identity: who it is, what it may claim (roles, labels, leader priority and
    eligibility: in authenticated mode these come from here, never from the peer), and its
    signing secret."""

    peer_id: str
    name: str
    roles: tuple[str, ...]
    secret: str
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    priority: int = 0
    eligible: bool = True

    def __repr__(self) -> str:
        return (f"Identity(peer_id={self.peer_id!r}, name={self.name!r}, roles={self.roles!r}, "
                f"labels={dict(self.labels)!r}, priority={self.priority}, eligible={self.eligible})")

    def member_info(self, claimed: Mapping[str, Any]) -> dict[str, Any]:
        """``claimed`` (what a register request says of the peer) with everything that decides
        what the peer may do (role, roles, labels, leader priority and eligibility) taken from
        this identity instead."""
        return {**claimed, "role": self.roles[0] if self.roles else "peer", "roles": list(self.roles),
                "labels": dict(self.labels), "priority": self.priority, "eligible": self.eligible}

    @functools.cached_property
    def mac(self) -> Any:
        """The keyed HMAC prototype the router checks this identity's signatures with."""
        return _mac(self.secret.encode())


def verify(identity: Identity | None, fields: Mapping[str, str], entry_ms: int,
           last_nonce: int) -> int:
    """Check one entry; returns its nonce, or raises AuthenticationFailed with the reason."""
    sender = fields.get("s", "")
    if identity is None:
        raise AuthenticationFailed(f"no identity for sender {sender!r}; create one with "
                                   "`sidecar peer add`")
    sig = fields.get("sig")
    if not sig:
        raise AuthenticationFailed(f"unsigned request from {sender!r}")
    if not hmac.compare_digest(tag(identity.mac, fields).encode(), sig.encode()):
        raise AuthenticationFailed(f"bad signature for sender {sender!r}")
    try:
        nonce = int(fields.get("n", ""))
    except ValueError:
        raise AuthenticationFailed("signed request without a numeric nonce 'n'") from None
    skew = abs(entry_ms - nonce // 1000)
    if skew > FRESHNESS_MS:
        raise AuthenticationFailed(f"stale request from {sender!r}: signed {skew} ms "
                                   "away from when Redis received it")
    if nonce <= last_nonce:
        raise AuthenticationFailed(f"replayed request from {sender!r} (nonce did not grow)")
    return nonce


class Identities:
    """The identity store on a sync client."""

    def __init__(self, client: Any, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def add(self, name: str, roles: list[str], *, labels: Mapping[str, str] | None = None,
            priority: int = 0, eligible: bool = True, redis_acl: bool = False) -> dict[str, str]:
        """Create an identity; returns what the peer needs (id, secret, and ACL credentials)."""
        peer_id = str(ULID())
        secret = secrets.token_urlsafe(32)
        record = {"name": name, "roles": roles, "secret": secret, "created": int(time.time()),
                  "labels": dict(labels or {}), "priority": int(priority), "eligible": bool(eligible)}
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.keys.identities, peer_id, dumps(record))
        pipe.incr(self.keys.routing_version)
        pipe.execute()
        out = {"SIDECAR_PEER_ID": peer_id, "SIDECAR_PEER_SECRET": secret}
        if redis_acl:
            user, password = self.create_acl_user(peer_id)
            out["SIDECAR_REDIS_USER"] = user
            out["SIDECAR_REDIS_PASSWORD"] = password
        return out

    def create_acl_user(self, peer_id: str) -> tuple[str, str]:
        """A Redis user that may write requests and read only its own inbox."""
        user = f"sidecar-peer-{peer_id}"
        password = secrets.token_urlsafe(32)
        commands = ["-@all", "+xadd", "+xreadgroup", "+xack", "+xdel", "+xgroup|create", "+ping",
                    "+client|setname", "+hello", "+auth", "+select"]
        keys = [f"%W~{self.keys.requests(0)}*", f"~{self.keys.responses(peer_id)}"]
        try:  # Redis 7.2+ has CLIENT SETINFO, which clients send on connect
            self.client.acl_setuser(user, enabled=True, reset_keys=True, reset_channels=True,
                                    reset_passwords=True, passwords=[f"+{password}"], keys=keys,
                                    commands=[*commands, "+client|setinfo"])
        except ResponseError:
            self.client.acl_setuser(user, enabled=True, reset_keys=True, reset_channels=True,
                                    reset_passwords=True, passwords=[f"+{password}"], keys=keys,
                                    commands=commands)
        return user, password

    def load(self) -> dict[str, Identity]:
        """Every identity by peer id."""
        out = {}
        for peer_id, raw in self.client.hgetall(self.keys.identities).items():
            try:
                rec = json.loads(raw)
                labels = rec.get("labels") or {}
                out[str(peer_id)] = Identity(
                    str(peer_id), str(rec["name"]), tuple(rec.get("roles") or ()), str(rec["secret"]),
                    labels={str(k): str(v) for k, v in labels.items()},
                    priority=int(rec.get("priority") or 0), eligible=bool(rec.get("eligible", True)))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
        return out
