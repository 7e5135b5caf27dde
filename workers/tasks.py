"""Thin Celery tasks over coordinator classes: beat's duties and the CLI's admin actions."""

from __future__ import annotations

from functools import cache
from typing import Any

import redis

from coordinator.cluster.duties import Duties
from workers.application import app, settings

__all__ = ["cluster_heartbeat", "distribute_policies", "elect", "evict", "ping", "sweep", "trim"]


@cache
def _duties() -> Duties:
    client = redis.Redis.from_url(app.conf.broker_url, decode_responses=True)
    return Duties(client, settings)


@app.task(name="sidecar.sweep", ignore_result=True)
def sweep() -> list[str]:
    """Evict silent members."""
    return _duties().sweep()


@app.task(name="sidecar.trim", ignore_result=True)
def trim() -> dict[str, int]:
    """Trim inboxes by age."""
    return _duties().trim()


@app.task(name="sidecar.elect", ignore_result=True)
def elect() -> dict[str, Any]:
    """Keep or change the leader."""
    return _duties().elect()


@app.task(name="sidecar.cluster_heartbeat", ignore_result=True)
def cluster_heartbeat() -> dict[str, Any]:
    """Publish cluster.heartbeat."""
    return _duties().cluster_heartbeat()


@app.task(name="sidecar.distribute_policies", ignore_result=True)
def distribute_policies() -> int:
    """Send the policy set to peers that have not acknowledged it."""
    return _duties().distribute_policies()


@app.task(name="sidecar.evict")
def evict(peer_id: str) -> bool:
    """Operator action: remove ``peer_id`` from the cluster now."""
    return _duties().evict(peer_id)


@app.task(name="sidecar.ping")
def ping(payload: Any = None) -> Any:
    """Echo ``payload``: the one-task-per-message anchor of the benchmark, and a liveness probe."""
    return payload
