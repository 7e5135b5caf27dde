"""The naive-design anchor: one Celery task (``sidecar.ping``, JSON) per message.

A publisher process sends ``count`` tasks with ``ignore_result``, then one last task whose result it
waits for. The worker runs solo (one process, as the router is one), takes tasks in order with a
prefetch of one, so when the last result arrives every task before it has run: tasks executed per
second is ``count + 1`` over the time from the first send to that result. The app is the project's
own (``workers.application``), configuration and all.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from bench.children import Channel, Role, run_stages

__all__ = ["CeleryParams", "celery_publisher", "run_celery"]


@dataclass(frozen=True)
class CeleryParams:
    """Send ``count`` ping tasks to the worker of ``namespace`` on ``url``."""

    url: str
    namespace: str
    count: int
    timeout: float = 60.0


async def celery_publisher(channel: Channel, p: CeleryParams) -> dict[str, Any]:
    """Send the tasks (see the module docstring); returns send and completion times."""
    os.environ["SIDECAR_REDIS_URL"] = p.url  # the app reads its settings when first imported
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
                app.send_task("sidecar.ping", args=[{"i": i}], ignore_result=True,
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


def run_celery(url: str, namespace: str, count: int, *, timeout: float = 60.0) -> dict[str, Any]:
    """One anchor run; returns ``msgs_per_s`` (tasks executed per second) and ``send_per_s``."""
    res = run_stages("celery", [[Role("celery-pub", celery_publisher,
                                      CeleryParams(url, namespace, count, timeout))]],
                     timeout + 20)["celery-pub"]
    start = res["start_ns"]
    return {"msgs_per_s": (count + 1) / ((res["done_ns"] - start) / 1e9),
            "send_per_s": count / ((res["sent_ns"] - start) / 1e9)}
