"""Thin Celery tasks over coordinator classes: beat's duties and the CLI's admin actions.

Each duty task is bound and reads the settings of the app it runs under
(``self.app.sidecar_settings``, see workers.application); there is no module-level settings object.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import redis
from celery import Task

from coordinator.cluster.duties import Duties
from workers.application import app

__all__ = ["cluster_heartbeat", "distribute_policies", "elect", "evict", "ping", "sweep", "trim",
           "watch_inboxes"]


@cache
def _duties(task_app: Any) -> Duties:
    """One Duties (and Redis client) per app, built from that app's broker and sidecar settings."""
    client = redis.Redis.from_url(task_app.conf.broker_url, decode_responses=True)
    return Duties(client, task_app.sidecar_settings)


@app.task(name="sidecar.sweep", bind=True, ignore_result=True)
def sweep(self: Task) -> list[str]:
    """Evict silent members."""
    return _duties(self.app).sweep()


@app.task(name="sidecar.trim", bind=True, ignore_result=True)
def trim(self: Task) -> dict[str, int]:
    """Trim inboxes by age."""
    return _duties(self.app).trim()


@app.task(name="sidecar.elect", bind=True, ignore_result=True)
def elect(self: Task) -> dict[str, Any]:
    """Keep or change the leader."""
    return _duties(self.app).elect()


@app.task(name="sidecar.cluster_heartbeat", bind=True, ignore_result=True)
def cluster_heartbeat(self: Task) -> dict[str, Any]:
    """Publish cluster.heartbeat."""
    return _duties(self.app).cluster_heartbeat()


@app.task(name="sidecar.watch_inboxes", bind=True, ignore_result=True)
def watch_inboxes(self: Task) -> list[str]:
    """Emit cluster.member.slow for members whose inbox lags."""
    return _duties(self.app).watch_inboxes()


@app.task(name="sidecar.distribute_policies", bind=True, ignore_result=True)
def distribute_policies(self: Task) -> int:
    """Send the policy set to peers that have not acknowledged it."""
    return _duties(self.app).distribute_policies()


@app.task(name="sidecar.evict", bind=True)
def evict(self: Task, peer_id: str) -> bool:
    """Operator action: remove ``peer_id`` from the cluster now."""
    return _duties(self.app).evict(peer_id)


@app.task(name="sidecar.ping")
def ping(payload: Any = None) -> Any:
    """Echo ``payload``: the one-task-per-message anchor of the benchmark, and a liveness probe."""
    return payload
