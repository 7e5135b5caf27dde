"""``ClusterSidecar``: the sidecar as an object.

``await sidecar.setup()`` starts a :class:`~coordinator.routing.router.Router` and the periodic duties
(:class:`~coordinator.cluster.duty_loop.DutyLoop`, gated by the same lease as celery beat) in the calling
process, so the seed's usage example runs with no Celery process at all; each Celery worker hosts a
router-only ClusterSidecar through a bootstep (sync ``start()``/``stop()``), beat doing the duties.
Several sidecars on one Redis form one highly available sidecar: the routers share the request
partitions under leases. With ``SIDECAR_NATS_URL`` set, the sidecar also runs the site's NATS
bridge (:mod:`coordinator.federation`), one active per site under its own lease.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import redis

from coordinator.clock import time_reply_ms
from coordinator.cluster.duty_loop import DutyLoop
from coordinator.cluster.membership import Membership, parse_subscription
from coordinator.federation.directory import parse_site
from coordinator.keys import Keys
from coordinator.protocol import INTERNAL_SUBSCRIPTIONS
from coordinator.routing.router import Router
from coordinator.settings import Settings
from coordinator.status import StatusField, StatusMixin

if TYPE_CHECKING:
    from coordinator.federation.bridge import BridgeThread

__all__ = ["ClusterSidecar"]


class ClusterSidecar(StatusMixin):
    """Membership, routing, election and policy duties for one namespace."""

    managed_peers = StatusField[list[str]](default_factory=list,
                                           doc="peers registered through this sidecar")
    active_subscriptions = StatusField(0, doc="peers' subscriptions (their internal ones apart)")
    cluster_size = StatusField(0, doc="live members (of every reachable site, with federation on)")
    leader_id = StatusField[str | None](None, doc="current leader, if any")
    leader_term = StatusField(0, doc="term of the current leader (the fencing token)")
    members = StatusField[dict[str, float]](default_factory=dict,
                                            doc="live member id -> seconds since its last heartbeat")
    sites = StatusField[dict[str, dict[str, Any]]](
        default_factory=dict, doc="with federation on: each site's members, leader and whether "
                                  "this site's bridge still hears from it")

    def __init__(self, namespace: str | None = None, logger: logging.Logger | None = None, *,
                 settings: Settings | None = None, redis_url: str | None = None,
                 name: str | None = None, run_duties: bool = True, run_bridge: bool = True) -> None:
        base = settings or Settings.from_env()
        self.settings = base.replace(**{k: v for k, v in (("namespace", namespace),
                                                         ("redis_url", redis_url)) if v})
        if not self.settings.redis_url:
            raise ValueError("ClusterSidecar needs a Redis URL: set SIDECAR_REDIS_URL or pass redis_url")
        self.namespace = self.settings.namespace
        self.logger = logger or logging.getLogger("sidecar")
        self.keys = Keys(self.namespace)
        self.client = redis.Redis.from_url(self.settings.redis_url, decode_responses=True,
                                           socket_keepalive=True)
        self.membership = Membership(self.client, self.keys)
        self.router = Router(self.client, self.settings, name=name)
        self.duty_loop = DutyLoop(self.client, self.settings) if run_duties else None
        self.bridge: BridgeThread | None = None
        if run_bridge and self.settings.nats_url:
            from coordinator.federation.bridge import BridgeThread

            self.bridge = BridgeThread(self.settings, name=self.router.name)
        self._managed: list[str] = []

    # ------------------------------------------------------------------ sync lifecycle (bootstep)
    def start(self) -> None:
        """Start routing (and, unless a beat does them, the periodic duties) in background threads."""
        self.router.start()
        if self.duty_loop is not None:
            self.duty_loop.start()
        if self.bridge is not None:
            self.bridge.start()
        self.logger.info("sidecar %s routing namespace %r", self.router.name, self.namespace)

    def stop(self) -> None:
        """Stop routing, the duties and the bridge, releasing their leases."""
        if self.bridge is not None:
            self.bridge.stop()
        if self.duty_loop is not None:
            self.duty_loop.stop()
        self.router.stop()

    # ------------------------------------------------------------------ async lifecycle (seed API)
    async def setup(self) -> None:
        """Start routing in this process and wait until a router (this or another) serves partition 0."""
        self.start()
        deadline = asyncio.get_running_loop().time() + self.settings.router_lease * 2 + 1
        while not await asyncio.to_thread(self.client.exists, self.keys.router_lease(0)):
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.01)

    async def teardown(self) -> None:
        """Stop routing and close the connection."""
        await asyncio.to_thread(self.stop)
        self.client.close()

    async def register_peer(self, peer_id: str, **info: Any) -> None:
        """Manage ``peer_id`` through this sidecar, making it a member if it is not one yet."""
        if not await asyncio.to_thread(self.client.zscore, self.keys.members, peer_id):
            await asyncio.to_thread(self.membership.register, peer_id, **info)
        if peer_id not in self._managed:
            self._managed.append(peer_id)

    # ------------------------------------------------------------------ status
    def refresh_status(self) -> None:
        """Read the cluster figures from Redis into the status fields."""
        pipe = self.client.pipeline(transaction=False)
        pipe.time()
        pipe.hkeys(self.keys.subs)
        pipe.hmget(self.keys.leader, "id", "term")
        pipe.zrange(self.keys.members, 0, -1, withscores=True)
        pipe.hgetall(self.keys.sites)
        clock, subs, (leader, term), members, sites = pipe.execute()
        now_ms = time_reply_ms(clock)
        seen = {str(m): round(max(0.0, now_ms - s) / 1000, 3) for m, s in members}
        self.managed_peers = [p for p in self._managed if p in seen]
        self.sites = {str(name): parse_site(record) for name, record in sorted(sites.items())}
        if self.sites:  # federated: the whole cluster, as far as it can be heard
            self.cluster_size = sum(len(s["members"]) for s in self.sites.values() if s["reachable"])
        else:
            self.cluster_size = len(seen)
        self.active_subscriptions = sum(  # a peer's own bookkeeping subscriptions apart
            1 for field in subs if parse_subscription(field)[1] not in INTERNAL_SUBSCRIPTIONS)
        self.leader_id = leader or None
        self.leader_term = int(term or 0)
        self.members = seen

    @property
    def status(self) -> dict[str, dict[str, Any]]:
        """Fresh cluster status under ``clustersidecar`` (one Redis round trip)."""
        self.refresh_status()
        return super().status

    def __repr__(self) -> str:
        return f"ClusterSidecar(namespace={self.namespace!r}, router={self.router.name!r})"

