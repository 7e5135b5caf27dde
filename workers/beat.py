"""A beat scheduler that dispatches only while it holds the beat lease.

Run two ``celery -A workers beat`` processes for availability: both tick, only the lease holder
sends tasks, and when it dies the other takes the lease over within about one lease period (it
retries every third of one). Renewals are checked by token, so a beat that stalled past its lease
stops dispatching instead of fighting the new holder.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from typing import Any

import redis
from celery.beat import PersistentScheduler
from redis.exceptions import RedisError

from coordinator.keys import Keys
from coordinator.leases import Lease

__all__ = ["LeasedScheduler"]

log = logging.getLogger("sidecar.beat")


class LeasedScheduler(PersistentScheduler):
    """PersistentScheduler gated by a Redis lease (``Settings.beat_lease``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from workers.application import settings

        self._settings = settings
        client = redis.Redis.from_url(settings.redis_url or "redis://127.0.0.1:6379/0",
                                      decode_responses=True)
        token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease = Lease(client, Keys(settings.namespace).beat_lease, token, settings.beat_lease)
        self.holding = False
        super().__init__(*args, **kwargs)

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """Renew (or try to take) the lease, then dispatch due tasks only if we hold it."""
        renew_every = self._settings.beat_lease / 3
        try:
            held = self.lease.acquire()
        except RedisError as exc:
            log.warning("beat: Redis unreachable (%s); not dispatching", exc)
            held = False
        if held != self.holding:
            log.info("beat %s %s the dispatch lease", self.lease.token,
                     "took" if held else "lost")
            self.holding = held
        if not held:
            return renew_every
        return min(float(super().tick(*args, **kwargs)), renew_every)

    def close(self) -> None:
        if self.holding:
            try:
                self.lease.release()
            except RedisError:
                pass
        super().close()
