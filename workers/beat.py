"""A beat scheduler that dispatches only while it holds the beat lease.

Run two ``celery -A workers beat`` processes for availability: both tick, only the lease holder
sends tasks, and when it dies the other takes the lease over within about one lease period (it
retries every ``Settings.beat_renew_interval``). Renewals are checked by token, so a beat that
stalled past its lease stops dispatching instead of fighting the new holder. The settings are those
of beat's app (``self.app.sidecar_settings``, see workers.application); the lease's value is a
``LeaseToken`` named ``beat@<hostname>``.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import redis
from celery.beat import PersistentScheduler
from redis.exceptions import RedisError

from coordinator.keys import Keys
from coordinator.leases import Lease, LeaseToken
from coordinator.settings import Settings

__all__ = ["LeasedScheduler"]

log = logging.getLogger("sidecar.beat")


class LeasedScheduler(PersistentScheduler):
    """PersistentScheduler gated by a Redis lease (``Settings.beat_lease``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings: Settings = self.app.sidecar_settings
        self._settings = settings
        # the lease lives on the app's broker, which its configuration derived from these settings
        client = redis.Redis.from_url(self.app.conf.broker_url, decode_responses=True)
        token = LeaseToken.new(f"beat@{socket.gethostname()}")
        self.lease = Lease(client, Keys(settings.namespace).beat_lease, token, settings.beat_lease)
        self.holding = False

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """Renew (or try to take) the lease, then dispatch due tasks only if we hold it."""
        renew_every = self._settings.beat_renew_interval
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
