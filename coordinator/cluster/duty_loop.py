"""The periodic duties without Celery: a thread that runs them while it holds the beat lease.

``ClusterSidecar.setup()`` starts one so the seed's example (no Celery process at all) still gets
failure detection, elections and policy distribution. It competes for the same lease as
``celery beat`` (workers.beat.LeasedScheduler), so however many run, one dispatches at a time.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from coordinator.cluster.duties import Duties
from coordinator.keys import Keys
from coordinator.leases import Lease, LeaseToken
from coordinator.settings import Settings

__all__ = ["DutyLoop"]

log = logging.getLogger("sidecar.duties")


class DutyLoop:
    """Runs sweep and election, cluster heartbeat, policy distribution and trim on a timer."""

    def __init__(self, client: Any, settings: Settings) -> None:
        self.duties = Duties(client, settings)
        token = LeaseToken.new(f"duties@{socket.gethostname()}")
        self.lease = Lease(client, Keys(settings.namespace).beat_lease, token, settings.beat_lease)
        self.tick = min(settings.duty_period, settings.beat_renew_interval)
        self.schedule: list[tuple[float, Callable[[], object]]] = [
            (settings.duty_period, self.duties.sweep),
            (settings.duty_period, self.duties.elect),
            (settings.heartbeat_interval, self.duties.cluster_heartbeat),
            (settings.policy_period, self.duties.distribute_policies),
            (settings.watch_period, self.duties.watch_inboxes),
            (settings.trim_period, self.duties.trim),
        ]
        self._due = [0.0] * len(self.schedule)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.holding = False

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self.run, name="sidecar-duties", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self.holding:
            try:
                self.lease.release()
            except RedisError:
                pass
            self.holding = False

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_due()
            except RedisError as exc:
                log.warning("duties: Redis error (%s); retrying", exc)
            except Exception:
                log.exception("duties: unexpected error; carrying on")
            self._stop.wait(self.tick)

    def run_due(self) -> None:
        """One tick: renew the lease, then run every duty that is due (only while holding it)."""
        self.holding = self.lease.acquire()
        if not self.holding:
            return
        now = time.monotonic()
        for i, (every, duty) in enumerate(self.schedule):
            if now >= self._due[i]:
                self._due[i] = now + every
                duty()
