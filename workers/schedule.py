"""Beat's schedule of the sidecar's duties; every entry expires so a backlog never floods workers."""

from __future__ import annotations

from typing import Any

from coordinator.settings import Settings

__all__ = ["beat_schedule"]


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Periodic tasks, each with an expiry no longer than its period (or ``task_expiry``)."""
    hb = settings.heartbeat_interval

    def entry(task: str, every: float) -> dict[str, Any]:
        return {"task": task, "schedule": every,
                "options": {"expires": min(settings.task_expiry, max(every, 0.5))}}

    return {
        "sweep": entry("sidecar.sweep", settings.duty_period),
        "elect": entry("sidecar.elect", settings.duty_period),
        "cluster-heartbeat": entry("sidecar.cluster_heartbeat", hb),
        "distribute-policies": entry("sidecar.distribute_policies", settings.policy_period),
        "watch-inboxes": entry("sidecar.watch_inboxes", settings.watch_period),
        "trim": entry("sidecar.trim", settings.trim_period),
    }
