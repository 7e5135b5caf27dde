"""The Celery app: JSON only, its own key prefix, the router bootstep and beat's schedule.

``celery -A workers worker`` hosts a router (bootstep); ``celery -A workers beat`` dispatches the
periodic duties. Importing this module reads no environment: the app owns its sidecar
:class:`~coordinator.settings.Settings` (``app.sidecar_settings``), built from ``SIDECAR_*``
variables the first time they are needed, which is at the latest when Celery configures the app.
The configuration that follows from them (broker URL, key prefix, queue, beat's schedule) is added
then as the app's defaults, the way Celery loads lazy configuration (``add_defaults``). Bootsteps,
the scheduler and the tasks read the settings from the app they run under.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

from celery import Celery
from celery.signals import after_setup_logger, after_setup_task_logger, celeryd_init

from coordinator.keys import Keys
from coordinator.settings import Settings
from workers import logs
from workers.bootsteps import BridgeStep, RouterStep
from workers.schedule import beat_schedule

__all__ = ["DEFAULT_BROKER", "SidecarCelery", "app", "celery_config"]

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
"""Broker of an app whose settings name no Redis (``SIDECAR_REDIS_URL`` unset)."""

_STATIC_CONF: dict[str, Any] = {
    "broker_connection_retry_on_startup": True,
    "task_serializer": "json",
    "result_serializer": "json",
    "accept_content": ["json"],
    "result_accept_content": ["json"],
    "event_serializer": "json",
    "result_expires": 3600,
    "task_send_sent_event": True,
    "worker_send_task_events": True,
    "worker_prefetch_multiplier": 1,
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "beat_scheduler": "workers.beat:LeasedScheduler",
    "timezone": "UTC",
}


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration that follows from ``settings``: broker, key prefix, queue, schedule."""
    broker = settings.redis_url or DEFAULT_BROKER
    prefix = {"global_keyprefix": Keys(settings.namespace).celery_prefix}
    return {
        "broker_url": broker,
        "result_backend": broker,
        "broker_transport_options": dict(prefix),
        "result_backend_transport_options": dict(prefix),
        "task_default_queue": f"sidecar.{settings.namespace}",
        "beat_schedule": beat_schedule(settings),
        "beat_max_loop_interval": max(0.05, settings.beat_renew_interval),
    }


class SidecarCelery(Celery):
    """A Celery app that owns the sidecar's settings.

    ``sidecar_settings`` is given to the constructor or to :meth:`use_sidecar_settings` before the
    app is configured, or else built with ``Settings.from_env()`` on first access; Celery's
    configuration step reads it (see :func:`celery_config`), so app and settings never disagree.
    """

    def __init__(self, *args: Any, sidecar_settings: Settings | None = None, **kwargs: Any) -> None:
        self._sidecar_settings = sidecar_settings
        self._sidecar_lock = threading.Lock()
        super().__init__(*args, **kwargs)
        self.conf.update(_STATIC_CONF)
        self.add_defaults(self._sidecar_conf)  # called when the app is configured, not now

    def _sidecar_conf(self) -> dict[str, Any]:
        return celery_config(self.sidecar_settings)

    @property
    def sidecar_settings(self) -> Settings:
        """This app's sidecar settings (from ``SIDECAR_*`` variables unless given)."""
        with self._sidecar_lock:
            if self._sidecar_settings is None:
                self._sidecar_settings = Settings.from_env()
            return self._sidecar_settings

    def use_sidecar_settings(self, settings: Settings) -> None:
        """Run this app with ``settings``; only before the app is configured or its settings read."""
        with self._sidecar_lock:
            if self.configured or self._sidecar_settings not in (None, settings):
                raise RuntimeError("the app's sidecar settings are in use already; set them "
                                   "before the app is configured")
            self._sidecar_settings = settings

    def __reduce_keys__(self) -> dict[str, Any]:
        """Celery rebuilds a pickled app from these; settings given explicitly travel with it."""
        return {**super().__reduce_keys__(), "sidecar_settings": self._sidecar_settings}


@celeryd_init.connect
def _worker_name(sender: Any = None, **_: Any) -> None:
    """Every log record of this worker names it (its Celery host name)."""
    logs.worker_started(sender)


@after_setup_logger.connect
@after_setup_task_logger.connect
def _structured_logs(logger: logging.Logger | None = None, **_: Any) -> None:
    """Celery's handlers write the sidecar's format, at ``SIDECAR_LOG_LEVEL`` unless ``-l`` was
    given, with beat's periodic duties at debug (workers.logs)."""
    if logger is not None:
        logs.setup(logger, app.sidecar_settings)


app = SidecarCelery("sidecar", include=["workers.tasks"])
app.steps["worker"].add(RouterStep)
app.steps["worker"].add(BridgeStep)

if "flower" in sys.argv:
    from workers.flower_guard import install

    install()
