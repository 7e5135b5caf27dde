"""Adaptive read coalescing: when the router waits a moment before reading a busy request stream
(and a peer before reading its busy inbox: the same trade on the subscriber's side).

Each read the router makes costs a round trip, a fan-out script call and a wake-up of every
subscriber it delivers to, whatever the batch holds. Under a steady stream of single publishes
(a publisher awaiting each one) that fixed cost is paid per message. :class:`ReadCoalescer` keeps
an estimate of the arrival rate and, while at least :data:`MIN_GAIN` more entries are expected
within ``linger`` seconds, asks the router to wait until ``linger`` after the last read returned
before it reads again, so one read, one script call and one inbox wake-up serve several publishes.

A conversation does not wait either: once the entries of a read that held a request, an answer
or a control call are handled (see :meth:`converse`), the reads of the next :data:`HORIZON`
seconds go at once. In a request/reply loop the next arrival follows the other side's turn, which
follows ours, so lingering would only hold the loop to the linger's pace. (A request arriving
while the reader already lingers after plain traffic still waits out that linger: the reader
cannot know what comes next.)

Sparse traffic never waits: at rates too low to gather :data:`MIN_GAIN` entries within the linger,
latency is untouched, and the estimate forgets within about :data:`HORIZON`, so a burst does not
make the sparse messages after it wait. A backlog never waits either (a read that filled the batch
reads again at once). The router sends the fan-out of what it already read before it waits, so the
most a message pays for coalescing is ``linger``; ``linger = 0`` turns it off. This is
the trade Kafka's ``linger.ms`` and TCP autocorking make, bounded and adaptive.
"""

from __future__ import annotations

import math

__all__ = ["HORIZON", "MIN_GAIN", "ReadCoalescer"]

MIN_GAIN = 2.0
"""Entries that must be expected within the linger before waiting for them is worth it."""

HORIZON = 0.01
"""Seconds over which the arrival-rate average forgets: a read after a quiet spell this long
counts almost alone, so sparse traffic after a burst does not wait."""


class ReadCoalescer:
    """Arrival-rate estimate over the router's reads and the wait it implies before the next one.

    Call :meth:`observe` with the time a read returned and the entries it held, then
    :meth:`delay` with the current time for how long to wait before the next read.
    """

    def __init__(self, linger: float, batch_size: int) -> None:
        if linger < 0:
            raise ValueError(f"linger must be >= 0, got {linger!r}")
        self.linger = linger
        self.batch_size = batch_size
        self.rate = 0.0
        """Estimated entries per second arriving on the streams read."""
        self._last_read: float | None = None
        self._last_count = 0
        self._conversing_until = 0.0

    def observe(self, now: float, entries: int) -> None:
        """A read returned at ``now`` (monotonic seconds) with ``entries`` entries."""
        if self._last_read is not None:
            elapsed = max(now - self._last_read, 1e-6)
            self.rate += (1.0 - math.exp(-elapsed / HORIZON)) * (entries / elapsed - self.rate)
        self._last_read = now
        self._last_count = entries

    def converse(self, now: float) -> None:
        """What the last read held, handled by ``now``, was something a peer waits on (a
        request, an answer, a control call): read again at once for the next :data:`HORIZON`
        seconds."""
        self._conversing_until = now + HORIZON

    def delay(self, now: float) -> float:
        """Seconds to wait before the next read (0 when coalescing would not pay)."""
        if (self.linger <= 0 or self._last_read is None or self._last_count >= self.batch_size
                or self.rate * self.linger < MIN_GAIN or now < self._conversing_until):
            return 0.0
        return max(0.0, self._last_read + self.linger - now)
