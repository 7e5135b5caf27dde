"""The one settings object shared by worker, beat, mixin, CLI and dashboard.

Precedence is flag, then environment, then default: build with ``Settings.from_env(**flags)`` where
``flags`` holds only the options the user actually gave. Every field is validated at construction, so a
process refuses to start with timings that cannot work (a member TTL shorter than two heartbeats, a
lease renewed less often than it expires). Secrets never appear in ``repr`` or ``describe()``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from coordinator.errors import ConfigurationError
from coordinator.topics import check_pattern

__all__ = ["LOG_LEVELS", "RESERVED_SITE", "Settings", "default_site", "redact_url"]

_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ENV_PREFIX = "SIDECAR_"


def redact_url(url: str | None) -> str | None:
    """Return ``url`` with any password replaced by ``***`` (safe to log)."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _secret() -> Any:
    return field(default=None, repr=False, metadata={"secret": True})


@dataclass(frozen=True)
class Settings:
    """Validated, immutable sidecar configuration. Times are seconds unless the name says ``_ms``."""

    redis_url: str | None = field(default=None, repr=False)
    """Membership store and data plane; ``None`` means `sidecar up` starts an embedded Redis."""
    nats_url: str | None = field(default=None, repr=False)
    """NATS server joining sidecars on different Redis servers; ``None`` disables the bridge."""
    namespace: str = "default"
    """Cluster name; every key lives under ``sidecar:{<namespace>}:``."""
    site: str | None = None
    """This Redis and its workers as one site of a federated cluster; every site joined through
    the same NATS needs its own name. Unset: the name the site's Redis already holds, else the
    host name of the first bridge that runs there (coordinator.federation.bridge)."""
    nats_export: str = ">"
    """Comma-separated topic patterns the bridge sends to other sites (``cluster.`` never goes)."""
    nats_creds: str | None = None
    """NATS credentials file (``.creds``, as nats-py's ``user_credentials`` takes it)."""
    nats_token: str | None = _secret()
    """NATS authentication token (user and password may also sit in ``nats_url``)."""
    nats_tls_ca: str | None = None
    """CA file to verify the NATS server with (``tls://`` URLs)."""
    nats_tls_cert: str | None = None
    """Client certificate file for NATS mutual TLS (with ``nats_tls_key``)."""
    nats_tls_key: str | None = None
    """Client key file for NATS mutual TLS."""
    nats_stream_max_age: float = 86_400.0
    """Seconds the namespace's JetStream stream keeps a message (how long a site may be away)."""
    nats_stream_max_bytes: int = 1_073_741_824
    """Bytes the namespace's stream holds before it discards its oldest messages."""
    nats_stream_replicas: int = 1
    """Copies JetStream keeps of the stream (up to the NATS cluster's size; 3 for production)."""
    nats_duplicate_window: float = 120.0
    """Seconds JetStream remembers message ids to drop a message sent twice."""
    bridge_batch: int = 256
    """Messages a bridge moves per round trip, each way."""
    bridge_backlog: int = 50_000
    """Messages a site holds for other sites while NATS is unreachable; past it the oldest are
    dead-lettered (``export_failed``) and counted. Keep it below ``inbox_maxlen``."""

    heartbeat_interval: float = 1.0
    """How often a peer stamps its membership record."""
    member_ttl: float = 3.0
    """A member silent for longer than this is evicted by the sweep."""
    router_lease: float = 2.0
    """A router owns a request partition for this long per renewal; a standby takes over after it."""
    partitions: int = 1
    """Request stream partitions; a sender always writes to the same one (order per publisher)."""
    batch_size: int = 512
    """Request entries a router reads per round trip."""
    router_linger: float = 0.0005
    """While requests arrive fast enough to gather a batch, the router waits up to this long after a
    read before the next one (see coordinator.routing.coalesce); sparse traffic does not wait, nor
    does a read right after requests, answers or control calls; 0 turns it off."""
    inbox_linger: float = 0.001
    """While messages arrive fast enough to gather several, a peer waits up to this long after an
    inbox read before the next one (the router's coalescing, on the subscriber's side); sparse
    traffic does not wait, nor does a read right after a request, an answer or a reply, or while
    the peer waits for one (coordinator.routing.coalesce); 0 turns it off."""
    inbox_maxlen: int = 100_000
    """Entries a peer's inbox holds; what happens past it is ``inbox_overflow``'s to say."""
    inbox_overflow: str = "drop_oldest"
    """A full inbox: ``drop_oldest`` trims its oldest entries, ``reject`` refuses the new message
    (dead-lettered for that peer as ``inbox_full``, nothing queued is lost); both are counted."""
    slow_consumer_lag: int = 10_000
    """A member with more unread inbox entries than this is slow (``cluster.member.slow``)."""
    data_path: str = "direct"
    """How peers publish: ``direct`` (each publish fans out in one script call of the publisher's,
    no router hop; in force only while ``auth`` is off and policies are not enforced, since those
    checks are the router's) or ``routed`` (every publish through the router)."""
    inbox_max_age: float = 3600.0
    """Entries older than this are trimmed from response streams by the trim duty."""
    deadletter_maxlen: int = 10_000
    """Entries kept in the dead-letter stream."""
    max_payload_bytes: int = 1_048_576
    """Largest JSON payload a publish may carry."""
    max_header_bytes: int = 4096
    """Largest a message's headers may be, as JSON text."""
    handler_max_deliveries: int = 5
    """Tries a message gets when its handler raises, before it is dead-lettered (handler_failed)."""
    handler_backoff: float = 0.1
    """Wait before the second try of a failed message; it doubles with each further try."""
    request_timeout: float = 5.0
    """How long a control request (register, subscribe, ...) waits for the router's reply."""
    publish_buffer: int = 10_000
    """Publishes a peer holds while Redis is unreachable before raising SidecarUnavailable."""
    beat_lease: float = 1.0
    """Lease a beat holds to dispatch; a second beat takes over within two lease periods."""
    task_expiry: float = 5.0
    """Periodic tasks not started within this many seconds are dropped (no backlog floods)."""

    enforce_policy: bool = False
    """Evaluate every publish and subscribe against the policies in force."""
    auth: str = "off"
    """``required``: requests must be signed by the sender's secret; ``off``: not checked."""

    peer_secret: str | None = _secret()
    """This peer's signing secret (peer processes only)."""
    log_format: str = "text"
    """How worker, beat, the CLI and apps that call ``coordinator.logs.configure`` log: ``text``
    (one line for people) or ``json`` (one JSON object per line); both carry time, level,
    component, namespace, site, peer_id and worker (coordinator.logs)."""
    log_level: str | None = None
    """Level of those processes (``debug``, ``info``, ``warning``, ``error``, ``critical``); a
    ``celery -l`` flag wins over it. Unset: Celery's ``-l`` (default warning), else warning."""
    peer_rate: float = 0.0
    """Messages a second the router reads from each peer's own request stream, at most, with
    ``SIDECAR_AUTH=required`` (0: no limit); a peer over it waits, nothing is refused."""
    peer_burst: int = 2000
    """Messages a peer may send at once before ``peer_rate`` holds it back."""
    peer_backlog: int = 100_000
    """Entries a peer's own request stream keeps at most; past it the router's trim drops the
    oldest, and counts them (``sidecar status``: dropped_requests)."""
    peer_key: str | None = _secret()
    """The key every peer secret is derived from (workers and the CLI, with
    ``SIDECAR_AUTH=required``): Redis holds no secret, only who each peer is."""
    dashboard_host: str = "127.0.0.1"
    """Where ``sidecar dashboard`` listens; beyond loopback only with the credentials below."""
    dashboard_port: int = 8765
    """The dashboard's port."""
    dashboard_user: str | None = None
    """Basic-auth user for Flower and the dashboard when they listen beyond loopback."""
    dashboard_password: str | None = _secret()
    """Basic-auth password for Flower and the dashboard."""

    def __post_init__(self) -> None:
        if not _NAMESPACE_RE.match(self.namespace):
            raise ConfigurationError(
                f"namespace {self.namespace!r} must be 1-64 characters of letters, digits, '_' or '-'"
            )
        positive = ("heartbeat_interval", "member_ttl", "router_lease", "request_timeout", "handler_backoff",
                    "inbox_max_age", "beat_lease", "task_expiry")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.site is not None and (not _NAMESPACE_RE.match(self.site) or len(self.site) > 32):
            raise ConfigurationError(
                f"site {self.site!r} must be 1-32 characters of letters, digits, '_' or '-'")
        if self.site == RESERVED_SITE:
            raise ConfigurationError(f"site {self.site!r} is reserved: it marks the messages of "
                                     "plain NATS clients; choose another SIDECAR_SITE")
        try:
            self.export_patterns  # noqa: B018 - validates them
        except ValueError as exc:
            raise ConfigurationError(f"nats_export: {exc}") from None
        if self.log_format not in ("text", "json"):
            raise ConfigurationError(f"log_format must be text or json, got {self.log_format!r}")
        if self.log_level is not None and self.log_level.lower() not in LOG_LEVELS:
            raise ConfigurationError(
                f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if not 0 <= self.dashboard_port <= 65535:
            raise ConfigurationError(f"dashboard_port must be 0-65535, got {self.dashboard_port!r}")
        if self.peer_rate < 0:
            raise ConfigurationError(f"peer_rate must be >= 0 (0: no limit), got {self.peer_rate!r}")
        for name in ("nats_stream_max_age", "nats_duplicate_window"):
            if not getattr(self, name) > 0:
                raise ConfigurationError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("partitions", "batch_size", "nats_stream_max_bytes", "nats_stream_replicas",
                     "bridge_batch", "bridge_backlog", "inbox_maxlen", "deadletter_maxlen",
                     "max_payload_bytes", "max_header_bytes", "publish_buffer", "handler_max_deliveries",
                     "slow_consumer_lag", "peer_burst", "peer_backlog"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.member_ttl < 2 * self.heartbeat_interval:
            raise ConfigurationError(
                f"member_ttl ({self.member_ttl}s) must be at least twice heartbeat_interval "
                f"({self.heartbeat_interval}s), or one late heartbeat evicts a healthy peer"
            )
        for name in ("router_linger", "inbox_linger"):
            if not 0 <= getattr(self, name) <= 0.05:
                raise ConfigurationError(
                    f"{name} must be between 0 and 0.05s, got {getattr(self, name)!r}: it is "
                    "added to the latency of every message while the stream is busy")
        if self.router_lease < 0.2:
            raise ConfigurationError("router_lease must be at least 0.2s so a router can renew it")
        if self.task_expiry < self.beat_lease:
            raise ConfigurationError(
                f"task_expiry ({self.task_expiry}s) must be at least beat_lease ({self.beat_lease}s), "
                "or a beat takeover could expire every task it sends")
        if self.task_expiry < self.duty_period:
            raise ConfigurationError(
                f"task_expiry ({self.task_expiry}s) is shorter than the sweep period "
                f"({self.duty_period:.2f}s): every sweep would expire before it ran")
        if self.inbox_overflow not in ("drop_oldest", "reject"):
            raise ConfigurationError(
                f"inbox_overflow must be 'drop_oldest' or 'reject', got {self.inbox_overflow!r}")
        if self.data_path not in ("direct", "routed"):
            raise ConfigurationError(f"data_path must be 'direct' or 'routed', got {self.data_path!r}")
        if self.auth not in ("off", "required"):
            raise ConfigurationError(f"auth must be 'off' or 'required', got {self.auth!r}")
        for name in ("redis_url", "nats_url"):
            url = getattr(self, name)
            if url is not None and "://" not in url:
                raise ConfigurationError(f"{name} is not a URL (expected scheme://host:port/...)")

    # ------------------------------------------------------------------ derived timings
    # The one home of every timing derived from the knobs above: beat's schedule, the in-process
    # duty loop, the scheduler and `sidecar doctor` all read these, so they cannot disagree.
    @property
    def duty_period(self) -> float:
        """How often the sweep and the election run: six times per member TTL (at least 50 ms)."""
        return max(0.05, self.member_ttl / 6)

    @property
    def policy_period(self) -> float:
        """How often beat sends the policy set to peers that have not acknowledged it."""
        return 0.5

    @property
    def watch_period(self) -> float:
        """How often inbox lag is checked for slow members (once per heartbeat, at least 1 s)."""
        return max(1.0, self.heartbeat_interval)

    @property
    def trim_period(self) -> float:
        """How often inboxes are trimmed by age and long-gone peers' inboxes deleted."""
        return 60.0

    @property
    def beat_renew_interval(self) -> float:
        """A beat renews (or tries to take) its lease three times per lease period."""
        return self.beat_lease / 3

    @property
    def failure_detection(self) -> float:
        """Longest time from a member's last heartbeat until the sweep evicts it."""
        return self.member_ttl + self.duty_period

    @property
    def failover_worst(self) -> float:
        """Longest time from the leader's last heartbeat until the election names another."""
        return self.failure_detection + self.duty_period

    @property
    def router_takeover_worst(self) -> float:
        """Longest time a partition goes unrouted after its router dies."""
        return self.router_lease + self.lease_renew_interval

    @property
    def beat_takeover_worst(self) -> float:
        """Longest time no beat dispatches after the dispatching one dies."""
        return self.beat_lease + self.beat_renew_interval

    @property
    def lease_renew_interval(self) -> float:
        """A router renews its lease three times per lease period."""
        return self.router_lease / 3

    @property
    def router_block_ms(self) -> int:
        """A router blocks on its stream no longer than it can afford before renewing."""
        return max(10, int(self.lease_renew_interval * 1000 / 2))

    @property
    def bridge_lease(self) -> float:
        """A site's active bridge holds its lease this long per renewal (the router's lease)."""
        return self.router_lease

    @property
    def export_patterns(self) -> tuple[str, ...]:
        """The patterns of ``nats_export``, checked (ValueError for a bad one)."""
        out = tuple(p.strip() for p in self.nats_export.split(",") if p.strip())
        for pattern in out:
            check_pattern(pattern)
        return out

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from ``SIDECAR_<FIELD>`` variables; non-``None`` ``overrides`` win."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(_ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigurationError(f"unknown settings: {', '.join(sorted(unknown))}")
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def describe(self) -> dict[str, Any]:
        """Every setting as plain values, URLs redacted and secrets masked: safe to print or log."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret"):
                value = "***" if value else None
            elif f.name.endswith("_url"):
                value = redact_url(value)
            out[f.name] = value
        return out

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.describe().items())
        return f"Settings({inner})"


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
"""The values ``log_level`` takes (in any case)."""

RESERVED_SITE = "nats"
"""The origin of plain NATS clients' messages: no site may take the name."""


def default_site() -> str:
    """The host name as a site name (what a site name may hold, at most 32 characters)."""
    name = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname().split(".")[0])[:32].strip("-")
    return name if name and name != RESERVED_SITE else "site"


def _parse(name: str, annotation: Any, raw: str) -> Any:
    kind = str(annotation)
    try:
        if "bool" in kind:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if "int" in kind:
            return int(raw)
        if "float" in kind:
            return float(raw)
    except ValueError:
        raise ConfigurationError(
            f"{_ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind.split('|')[0].strip()}"
        ) from None
    return raw
