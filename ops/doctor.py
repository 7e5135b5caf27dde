"""Checks before running: Redis version, eviction policy, and the timings the sidecar would use."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from redis.exceptions import RedisError, ResponseError

from coordinator.settings import Settings

__all__ = ["Check", "diagnose", "timing_figures"]

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
    return checks
