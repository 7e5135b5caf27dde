"""Checks before running: Redis version, eviction policy, and the timings the sidecar would use."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from redis.exceptions import RedisError, ResponseError

from coordinator.errors import ConfigurationError
from coordinator.keys import Keys
from coordinator.policy.auth import PEER_COMMANDS, Identities, acl_user
from coordinator.settings import Settings

__all__ = ["Check", "diagnose", "hardened", "timing_figures"]

MIN_REDIS = (6, 2)


@dataclass(frozen=True)
class Check:
    """One finding: ``level`` is ok, warn or fail."""

    name: str
    level: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def timing_figures(settings: Settings) -> dict[str, float]:
    """What the settings imply: how often duties run and how long failure detection takes."""
    return {
        "heartbeat_interval_s": settings.heartbeat_interval,
        "member_ttl_s": settings.member_ttl,
        "sweep_and_elect_every_s": round(settings.duty_period, 3),
        "worst_detection_s": round(settings.failure_detection, 3),
        "worst_failover_s": round(settings.failover_worst, 3),
        "router_lease_s": settings.router_lease,
        "router_takeover_worst_s": round(settings.router_takeover_worst, 3),
        "beat_lease_s": settings.beat_lease,
        "beat_takeover_worst_s": round(settings.beat_takeover_worst, 3),
        "task_expiry_s": settings.task_expiry,
    }


def diagnose(client: Any, settings: Settings) -> list[Check]:
    """Everything worth knowing before starting a sidecar on ``client``'s Redis."""
    checks: list[Check] = []
    try:
        info = client.info("server")
    except RedisError as exc:
        return [Check("redis", "fail", f"cannot reach Redis: {exc}")]
    version = str(info.get("redis_version", "0"))
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    ok = parts >= MIN_REDIS
    checks.append(Check("redis_version", "ok" if ok else "fail",
                        f"Redis {version}" + ("" if ok else " is too old: streams need 6.2 or newer")))
    try:
        policy = str(client.config_get("maxmemory-policy").get("maxmemory-policy", "unknown"))
    except ResponseError:
        policy = "unknown"
    if policy == "noeviction":
        checks.append(Check("maxmemory_policy", "ok", "noeviction"))
    elif policy == "unknown":
        checks.append(Check("maxmemory_policy", "warn",
                            "CONFIG GET is not allowed here; make sure the policy is noeviction"))
    else:
        checks.append(Check("maxmemory_policy", "fail",
                            f"{policy} may silently evict membership, lease or election keys; "
                            "set maxmemory-policy noeviction"))
    if settings.auth == "off":
        checks.append(Check("auth", "warn", "request signing is off (SIDECAR_AUTH=required hardens it)"))
    else:
        checks.append(Check("auth", "ok", "requests must be signed"))
        checks += hardened(client, settings)
    return checks


def hardened(client: Any, settings: Settings) -> list[Check]:
    """What hardened mode needs beyond signing: the peer key, a locked default user, and each
    peer's Redis user holding no more than its own two keys and the commands it needs."""
    checks = [Check("peer_key", "ok", "SIDECAR_PEER_KEY is set") if settings.peer_key else
              Check("peer_key", "fail", "SIDECAR_PEER_KEY is not set: peer secrets derive from it; "
                    "set it for the workers and the CLI")]
    try:
        default = client.acl_getuser("default") or {}
        users = [str(u) for u in client.acl_users()]
    except ResponseError as exc:
        return [*checks, Check("redis_users", "warn", f"cannot read Redis's users here ({exc}); "
                               "check them as an administrator")]
    flags = set(default.get("flags") or ())
    if "on" in flags and "nopass" in flags:
        checks.append(Check("default_user", "fail",
                            "Redis's default user is on without a password: anyone reaching Redis "
                            "reads and writes everything (queues Celery tasks, speaks as the "
                            "sidecar); run `sidecar harden`"))
    else:
        checks.append(Check("default_user", "ok", "the default user is off or needs a password"))
    keys = Keys(settings.namespace)
    identities = set(client.hkeys(keys.identities))
    store = Identities(client, keys, settings.peer_key)
    try:
        store.require_acl_selectors()
    except ConfigurationError as exc:
        return [*checks, Check("redis_acl", "fail", f"{exc}: hardened mode needs it")]
    for peer_id in sorted(identities):
        user = acl_user(peer_id)
        if user not in users:
            checks.append(Check(f"peer_user {peer_id}", "warn",
                                "no Redis user of its own; make one with `sidecar peer rotate "
                                f"{peer_id} --redis-acl`"))
            continue
        extra = _beyond(client.acl_getuser(user) or {}, store.acl_keys(peer_id),
                        store.acl_selector(peer_id))
        checks.append(Check(f"peer_user {peer_id}", "fail" if extra else "ok",
                            f"{user} has more than it needs ({'; '.join(extra)}); reset it with "
                            f"`sidecar peer rotate {peer_id} --redis-acl`" if extra else
                            "its own request stream and inbox, nothing else"))
    return checks


def _beyond(user: dict[str, Any], keys: list[str], selector: str) -> list[str]:
    """What a peer's Redis user holds beyond ``keys``, :data:`PEER_COMMANDS` and ``selector``
    (as ``Identities.create_acl_user`` makes it)."""
    allowed = {f"+{c}" for c in PEER_COMMANDS} | {"+client|setinfo"}
    extra = [f"key pattern {k}" for k in user.get("keys") or () if k not in keys]
    extra += [f"channel pattern {k}" for k in user.get("channels") or ()]
    extra += [f"command {c}" for c in user.get("commands") or () if c.startswith("+") and c not in allowed]
    extra += [f"category {c}" for c in user.get("categories") or () if c.startswith("+")]
    key, _, command = selector.strip("()").partition(" ")
    for found in user.get("selectors") or ():
        fields = dict(zip(found[::2], found[1::2], strict=False)) if isinstance(found, list) else found
        if (fields.get("keys"), fields.get("commands"), fields.get("channels") or "") != (
                key, f"-@all {command}", ""):
            extra.append(f"selector {fields}")
    return extra
