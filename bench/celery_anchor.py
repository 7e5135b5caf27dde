"""The naive-design anchor: one Celery task per message, carrying the route scenarios' payload.

A publisher process sends ``count`` tasks (payload ``{"i": index, "t": send time}``), then one last
task whose completion it waits for. The worker runs solo (one process, as the router is one), so it
runs tasks in the order they arrive and when the last one is done every task before it has run:
tasks executed per second is ``count + 1`` over the time from the first send to that completion.
Two configurations, each with its own worker (``bench.services``):

``default`` (``celery_task_msgs_per_s``, the figure ratios use)
    Celery's default configuration (:mod:`bench.celery_default`): default prefetch, no
    ``acks_late``, no task events, JSON, no result backend. The last task pushes to a Redis list the
    publisher BLPOPs.
``project``
    the project's own app (``workers.application``) and configuration: prefetch one, ``acks_late``,
    task events, results in Redis; the publisher waits for the last ``sidecar.ping``'s result.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis

from bench.children import Channel, Role, run_stages

__all__ = ["CONFIGS", "CeleryParams", "celery_publisher", "run_celery"]

CONFIGS = ("default", "project")


@dataclass(frozen=True)
class CeleryParams:
    """Send ``count`` ping tasks to the ``config`` worker of ``namespace`` on ``url``."""

    url: str
    namespace: str
    count: int
    config: str = "default"
    timeout: float = 60.0


def _payload(i: int) -> dict[str, int]:
    return {"i": i, "t": time.monotonic_ns()}


async def _publish_default(channel: Channel, p: CeleryParams) -> dict[str, Any]:
    from bench.celery_default import DONE_TASK, TASK, make_app

    app = make_app(p.url)
    done_key = f"bench:{p.namespace}:celery-done:{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(p.url, decode_responses=True)
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=3)
            producer = app.producer_pool.acquire(block=True)
            try:
                channel.ready()
                await channel.wait_go(p.timeout)
                start_ns = time.monotonic_ns()
                for i in range(p.count):
                    app.send_task(TASK, args=[_payload(i)], producer=producer)
                sent_ns = time.monotonic_ns()
                app.send_task(DONE_TASK, args=[done_key, "last"], producer=producer)
            finally:
                producer.release()
        deadline = time.monotonic() + p.timeout
        echoed = None
        while echoed is None and time.monotonic() < deadline:  # short blocks: the client's socket
            echoed = client.blpop([done_key], timeout=1)       # timeout is a few seconds
        done_ns = time.monotonic_ns()
    finally:
        client.close()
    if echoed is None or echoed[1] != "last":
        raise RuntimeError(f"the last task signalled {echoed!r}")
    return {"start_ns": start_ns, "sent_ns": sent_ns, "done_ns": done_ns}


async def _publish_project(channel: Channel, p: CeleryParams) -> dict[str, Any]:
    # the project's app takes its settings from SIDECAR_* variables when it is first configured,
    # which is after this import
    os.environ["SIDECAR_REDIS_URL"] = p.url
    os.environ["SIDECAR_NAMESPACE"] = p.namespace
    from workers.application import app

    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=3)
        producer = app.producer_pool.acquire(block=True)
        try:
            channel.ready()
            await channel.wait_go(p.timeout)
            start_ns = time.monotonic_ns()
            for i in range(p.count):
                app.send_task("sidecar.ping", args=[_payload(i)], ignore_result=True,
                              producer=producer)
            sent_ns = time.monotonic_ns()
            last = app.send_task("sidecar.ping", args=["last"], producer=producer)
        finally:
            producer.release()
    echoed = last.get(timeout=p.timeout)
    done_ns = time.monotonic_ns()
    if echoed != "last":
        raise RuntimeError(f"the last ping echoed {echoed!r}")
    return {"start_ns": start_ns, "sent_ns": sent_ns, "done_ns": done_ns}


async def celery_publisher(channel: Channel, p: CeleryParams) -> dict[str, Any]:
    """Send the tasks (see the module docstring); returns send and completion times."""
    if p.config == "default":
        return await _publish_default(channel, p)
    if p.config == "project":
        return await _publish_project(channel, p)
    raise ValueError(f"unknown Celery configuration {p.config!r}")


def run_celery(url: str, namespace: str, count: int, *, config: str = "default",
               timeout: float = 60.0) -> dict[str, Any]:
    """One anchor run; ``msgs_per_s`` (tasks executed per second), ``send_per_s`` and the
    publisher's CPU per task."""
    res = run_stages(f"celery-{config}", [[Role("celery-pub", celery_publisher, CeleryParams(
        url, namespace, count, config, timeout))]], timeout + 20)["celery-pub"]
    start = res["start_ns"]
    return {"msgs_per_s": (count + 1) / ((res["done_ns"] - start) / 1e9),
            "send_per_s": count / ((res["sent_ns"] - start) / 1e9),
            "cpu_us_per_msg": {"publisher": res["cpu_s"] * 1e6 / (count + 1)}}
