"""A Celery app with Celery's default configuration, for the naive-design anchor.

Nothing is configured but the broker (``SIDECAR_REDIS_URL``, read when the worker first asks for
``app``): Celery's default prefetch (four per pool process), early acknowledgement (no
``acks_late``), no task events, the JSON serializer and no result backend, so no task stores a
result. ``celery -A bench.celery_default worker -P solo`` runs it (``bench.services`` starts it).

Its one task, ``bench.ping``, returns its payload. The run's last task instead pushes its payload to
a Redis list the publisher waits on: the solo pool runs tasks in the order they arrive, so when that
push lands every task before it has run, with no result backend involved. When the worker is ready
it sets :func:`ready_key`.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_ready

__all__ = ["DONE_TASK", "TASK", "make_app", "ready_key"]

TASK = "bench.ping"
DONE_TASK = "bench.done"


def ready_key(namespace: str) -> str:
    """The key a default-configuration worker of ``namespace`` sets once it consumes tasks."""
    return f"bench:{namespace}:celery-default:ready"


def _ping(payload: Any = None) -> Any:
    return payload


@cache
def _redis(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True)


def make_app(url: str) -> Any:
    """A Celery app on broker ``url`` with every other setting at Celery's default."""
    app = Celery("bench_default", broker=url, set_as_current=False)

    def done(key: str, payload: Any = None) -> None:
        _redis(url).rpush(key, str(payload))

    app.task(name=TASK)(_ping)
    app.task(name=DONE_TASK)(done)
    return app


def _on_ready(sender: Any = None, **_: Any) -> None:
    _redis(os.environ["SIDECAR_REDIS_URL"]).set(
        ready_key(os.environ.get("SIDECAR_NAMESPACE", "default")), "1")


def __getattr__(name: str) -> Any:
    """``app`` for ``celery -A bench.celery_default``: built on first access, from the environment."""
    if name == "app":
        app = make_app(os.environ.get("SIDECAR_REDIS_URL") or "redis://127.0.0.1:6379/0")
        worker_ready.connect(_on_ready, weak=False)
        globals()["app"] = app
        return app
    raise AttributeError(name)
