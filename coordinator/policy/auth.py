"""Request authentication: per-peer identities with secrets, HMAC-signed request entries.

With ``SIDECAR_AUTH=required`` every request entry carries ``n`` (a nonce: the signer's clock in
microseconds, raised by one whenever that would not make it grow, so it grows with every request of
the peer) and ``sig`` (HMAC-SHA256 over every other field, truncated to 128 bits as RFC 4868 does).
The router checks the signature with the claimed sender's secret, that the nonce's time is within
:data:`FRESHNESS_MS` of the entry's Redis-assigned id (so a copied entry written again later is
stale) and that the nonce grew (so a copy written again at once is a replay). The last nonce
accepted from each sender is stored in Redis with the work it allowed (see coordinator.routing.guard), so a
router taking a partition over refuses replays of what its predecessor accepted.

Identities live in Redis (``identities`` hash) where routers can read them; they hold no secret
(each is derived from ``SIDECAR_PEER_KEY``). A peer's Redis user (``sidecar peer add --redis-acl``,
Redis 7.0 or newer) may append to its own request stream and read, acknowledge and delete in its
own inbox, and nothing else: not even append to that inbox.
"""

from __future__ import annotations

import base64
import contextlib
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

from coordinator.errors import AuthenticationFailed, ConfigurationError, UnknownPeer
from coordinator.keys import Keys
from coordinator.protocol import dumps

__all__ = ["ACL_MIN_REDIS", "FRESHNESS_MS", "PEER_COMMANDS", "TAG_HEX", "Identities", "Identity",
           "Signer", "acl_user", "canonical", "derive_secret", "tag", "verify"]

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


PEER_COMMANDS = ("xreadgroup", "xack", "xdel", "xgroup|create", "ping", "client|setname", "hello",
                 "auth", "select")
"""The commands a peer's Redis user may run on its inbox, or on no key (and ``client|setinfo``
where Redis has it); on its own request stream it may run XADD alone (an ACL selector)."""
ACL_MIN_REDIS = (7, 0)
"""Redis that has ACL selectors: a command allowed on one key and not on another."""


def acl_user(peer_id: str) -> str:
    """The name of ``peer_id``'s Redis user."""
    return f"sidecar-peer-{peer_id}"


def derive_secret(peer_key: str, namespace: str, peer_id: str, generation: int) -> str:
    """The signing secret of ``peer_id`` in its ``generation`` (rotating moves it on), derived
    from the sidecar's ``peer_key``: no secret is ever stored, only who each peer is."""
    message = f"sidecar-peer-secret\0{namespace}\0{peer_id}\0{generation}".encode()
    digest = hmac.new(peer_key.encode(), message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


class Identities:
    """The identity store on a sync client. Records hold who a peer is (name, roles, labels,
    leader priority and eligibility, and the generation of its secret); the secret itself is
    derived from ``peer_key`` (``SIDECAR_PEER_KEY``), which the workers and the CLI hold and
    Redis never sees, so reading Redis yields nothing to sign with."""

    def __init__(self, client: Any, keys: Keys, peer_key: str | None) -> None:
        self.client = client
        self.keys = keys
        self._peer_key = peer_key

    def __repr__(self) -> str:
        return f"Identities(namespace={self.keys.namespace!r})"

    def require_key(self) -> str:
        """The peer key; raises ConfigurationError, with the fix, when it is not set."""
        if not self._peer_key:
            raise ConfigurationError(
                "SIDECAR_PEER_KEY is not set: with SIDECAR_AUTH=required every peer secret is "
                "derived from it (workers and the CLI need it, peers do not); make one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
        return self._peer_key

    def secret(self, peer_id: str, generation: int) -> str:
        """The signing secret of ``peer_id`` in ``generation``."""
        return derive_secret(self.require_key(), self.keys.namespace, peer_id, generation)

    def add(self, name: str, roles: list[str], *, labels: Mapping[str, str] | None = None,
            priority: int = 0, eligible: bool = True, redis_acl: bool = False) -> dict[str, str]:
        """Create an identity; returns what the peer needs (id, secret, and ACL credentials)."""
        peer_id = str(ULID())
        secret = self.secret(peer_id, 1)
        out = {"SIDECAR_PEER_ID": peer_id, "SIDECAR_PEER_SECRET": secret}
        if redis_acl:  # first: a Redis that cannot express the rules leaves no identity behind
            out["SIDECAR_REDIS_USER"], out["SIDECAR_REDIS_PASSWORD"] = self.create_acl_user(peer_id)
        record = {"name": name, "roles": roles, "generation": 1, "created": int(time.time()),
                  "labels": dict(labels or {}), "priority": int(priority), "eligible": bool(eligible)}
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.keys.identities, peer_id, dumps(record))
        pipe.incr(self.keys.routing_version)
        pipe.execute()
        return out

    def find(self, ref: str) -> str:
        """The peer id of identity ``ref`` (its id, or its name when only one has it)."""
        records = self.client.hgetall(self.keys.identities)
        if ref in records:
            return ref
        named = [peer for peer, raw in records.items() if _record(raw).get("name") == ref]
        if len(named) != 1:
            raise UnknownPeer(f"no identity {ref!r}" if not named else
                              f"{len(named)} identities are named {ref!r}; give the peer id")
        return str(named[0])

    def rotate(self, ref: str, *, redis_acl: bool = False) -> dict[str, str]:
        """Give identity ``ref`` a new secret (and, with ``redis_acl``, a new Redis password);
        the old one fails from the routers' next look at the identities on."""
        peer_id = self.find(ref)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.watch(self.keys.identities)
            record = _record(pipe.hget(self.keys.identities, peer_id))
            record["generation"] = int(record.get("generation") or 1) + 1
            pipe.multi()
            pipe.hset(self.keys.identities, peer_id, dumps(record))
            pipe.incr(self.keys.routing_version)
            pipe.execute()
        out = {"SIDECAR_PEER_ID": peer_id,
               "SIDECAR_PEER_SECRET": self.secret(peer_id, record["generation"])}
        if redis_acl:
            user, password = self.create_acl_user(peer_id)
            out["SIDECAR_REDIS_USER"] = user
            out["SIDECAR_REDIS_PASSWORD"] = password
        return out

    def revoke(self, ref: str) -> str:
        """Delete identity ``ref`` and its Redis user (Redis closes that user's connections);
        returns its peer id. The caller evicts the member."""
        peer_id = self.find(ref)
        pipe = self.client.pipeline(transaction=True)
        pipe.hdel(self.keys.identities, peer_id)
        pipe.hdel(self.keys.nonces, peer_id)
        pipe.incr(self.keys.routing_version)
        pipe.execute()
        with contextlib.suppress(ResponseError):  # it had none
            self.client.acl_deluser(acl_user(peer_id))
        return peer_id

    def create_acl_user(self, peer_id: str) -> tuple[str, str]:
        """A Redis user that reaches two keys, both its own: its request stream, where it may
        only append (whatever ids or trimming it asks for there touch its own requests alone),
        and its inbox, where it reads, acknowledges and deletes (never appends: an entry of its
        own there, say the largest possible id, would stop every delivery to it, and the fan-out
        it rides along with). Needs Redis 7.0 (ACL selectors)."""
        self.require_acl_selectors()
        user = acl_user(peer_id)
        password = secrets.token_urlsafe(32)
        rules = ["reset", "on", f">{password}", *self.acl_keys(peer_id), "resetchannels", "-@all",
                 *(f"+{c}" for c in PEER_COMMANDS), self.acl_selector(peer_id)]
        try:  # Redis 7.2+ has CLIENT SETINFO, which clients send on connect
            self.client.execute_command("ACL", "SETUSER", user, *rules, "+client|setinfo")
        except ResponseError:
            self.client.execute_command("ACL", "SETUSER", user, *rules)
        return user, password

    def require_acl_selectors(self) -> None:
        """Raise ConfigurationError, with the fix, on a Redis without ACL selectors."""
        version = str(self.client.info("server").get("redis_version", "0"))
        if tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < ACL_MIN_REDIS:
            raise ConfigurationError(
                f"a peer's Redis user needs Redis 7.0 or newer (ACL selectors: XADD allowed on its "
                f"request stream, not on its inbox); this Redis is {version}")

    def acl_keys(self, peer_id: str) -> list[str]:
        """The key pattern of ``peer_id``'s Redis user outside its selector: its inbox."""
        return [f"~{self.keys.responses(peer_id)}"]

    def acl_selector(self, peer_id: str) -> str:
        """The selector of ``peer_id``'s Redis user: XADD on its own request stream, alone."""
        return f"(~{self.keys.peer_requests(peer_id)} +xadd)"

    def load(self) -> dict[str, Identity]:
        """Every identity by peer id, with its secret derived."""
        key = self.require_key()
        out = {}
        for peer_id, raw in self.client.hgetall(self.keys.identities).items():
            try:
                rec = _record(raw)
                labels = rec.get("labels") or {}
                secret = derive_secret(key, self.keys.namespace, str(peer_id),
                                       int(rec.get("generation") or 1))
                out[str(peer_id)] = Identity(
                    str(peer_id), str(rec["name"]), tuple(rec.get("roles") or ()), secret,
                    labels={str(k): str(v) for k, v in labels.items()},
                    priority=int(rec.get("priority") or 0), eligible=bool(rec.get("eligible", True)))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
        return out


def _record(raw: str | None) -> dict[str, Any]:
    """An identity record ({} when unreadable)."""
    try:
        record = json.loads(raw or "")
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}
