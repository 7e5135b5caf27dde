"""The Celery app: JSON only, its own key prefix, the router bootstep and beat's schedule.

``celery -A workers worker`` hosts a router (bootstep); ``celery -A workers beat`` dispatches the
periodic duties. Settings come from ``SIDECAR_*`` variables (coordinator.settings).
"""

from __future__ import annotations

import sys

from celery import Celery

from coordinator.keys import Keys
from coordinator.settings import Settings
from workers.bootsteps import RouterStep
from workers.schedule import beat_schedule

__all__ = ["app", "settings"]

settings = Settings.from_env()
_keys = Keys(settings.namespace)
_broker = settings.redis_url or "redis://127.0.0.1:6379/0"

app = Celery("sidecar", include=["workers.tasks"])
app.conf.update(
    broker_url=_broker,
    result_backend=_broker,
    broker_transport_options={"global_keyprefix": _keys.celery_prefix},
    result_backend_transport_options={"global_keyprefix": _keys.celery_prefix},
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    event_serializer="json",
    task_default_queue=f"sidecar.{settings.namespace}",
    result_expires=3600,
    task_send_sent_event=True,
    worker_send_task_events=True,
    worker_prefetch_multiplier=1,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    beat_schedule=beat_schedule(settings),
    beat_scheduler="workers.beat:LeasedScheduler",
    beat_max_loop_interval=max(0.05, settings.beat_lease / 3),
    timezone="UTC",
)
app.steps["worker"].add(RouterStep)

if "flower" in sys.argv:
    from workers.flower_guard import install

    install()
