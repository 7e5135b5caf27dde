"""Policy convergence: from ``policy set`` until every one of many lightweight peers acknowledged.

``run_policy_convergence`` starts a worker and a beat, spreads ``peers`` peers over ``procs``
processes (each process one event loop with many peers), waits until all are members, then sets a
policy and distributes it as ``sidecar policy set`` does; the figure is the time until
``PolicyStore.status()`` shows every peer SYNCED on the new version. Worker, beat and peers run at
the default timings of :class:`coordinator.settings.Settings` (no ``SIDECAR_*`` timing variable is
set), so the peers' heartbeats load the Redis as a default deployment's would.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
import uuid
from typing import Any

import redis

from bench.ha import _Procs, _wait
from coordinator.keys import Keys
from coordinator.policy.store import PolicyStore
from coordinator.settings import Settings

__all__ = ["run_policy_convergence"]

DOCUMENT = {"statements": [{"id": "all", "effect": "allow", "role_ids": ["*"], "action": "*",
                            "resource": ">"}], "data": {"tempo": 120}}


def run_policy_convergence(url: str, peers: int = 1000, procs: int = 4,
                           timeout: float = 120.0) -> dict[str, float]:
    """Returns policy_convergence_<peers>_peers_s (and the setup time, for context)."""
    namespace = f"bench-policy-{uuid.uuid4().hex[:6]}"
    children = _Procs(url, namespace, {})  # default timings
    client = redis.Redis.from_url(url, decode_responses=True)
    keys = Keys(namespace)
    store = PolicyStore(client, keys)
    try:
        children.worker()
        children.beat()
        started = time.monotonic()
        share = [peers // procs + (1 if i < peers % procs else 0) for i in range(procs)]
        for count in share:
            children.spawn("-m", "bench.policy_conv", str(count))
        _wait(lambda: client.zcard(keys.members) >= peers, timeout, f"{peers} peers joining")
        setup = time.monotonic() - started
        set_at = time.monotonic()
        version = store.set("bench", DOCUMENT, by="bench")
        store.distribute(force=True)

        def synced() -> bool:
            rows = store.status()
            return len(rows) >= peers and all(r["state"] == "SYNCED" and r["applied"] == version
                                              for r in rows)

        _wait(synced, timeout, f"{peers} peers acknowledging version {version}")
        timings = Settings.from_env(children.env)
        return {f"policy_convergence_{peers}_peers_s": time.monotonic() - set_at,
                f"policy_setup_{peers}_peers_s": setup,
                "policy_heartbeat_interval_s": timings.heartbeat_interval,
                "policy_member_ttl_s": timings.member_ttl}
    finally:
        children.close()
        client.close()


async def _host(count: int) -> None:
    """Run ``count`` peers in this process until SIGTERM."""
    from mixin import Agent, SidecarMixin

    class Light(Agent, SidecarMixin):
        async def on_policy(self, policies: dict[str, Any]) -> None:
            if "bench" not in policies:
                raise ValueError("expected the bench policy")

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    settings = Settings.from_env()
    peers = [Light(namespace=settings.namespace, settings=settings) for _ in range(count)]
    for i in range(0, count, 50):  # join in waves so registration does not time out
        await asyncio.gather(*(p.setup() for p in peers[i:i + 50]))
    await stop.wait()
    await asyncio.gather(*(p.teardown() for p in peers), return_exceptions=True)


if __name__ == "__main__":
    asyncio.run(_host(int(sys.argv[1])))
