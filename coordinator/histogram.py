"""Histograms a process fills in memory and adds to a Redis hash now and then.

A router observes every batch it reads and every message it fans out; writing each observation to
Redis would cost a round trip per message, so a :class:`Histogram` counts per bucket in memory and
:meth:`Histogram.pending` hands the counts since the last flush to the owner's counter flush, which
adds them (HINCRBY, HINCRBYFLOAT) to one hash shared by every process of the namespace.
:func:`cumulative` reads them back as Prometheus wants them: cumulative buckets, sum and count.

Fields of the hash: ``<name>:le:<bound>`` (observations in the bucket ending at ``bound``, not
cumulative), ``<name>:le:+Inf``, ``<name>:sum`` and ``<name>:count``. A process clears its counts
only once the flush went through, so a failed flush loses nothing.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping

__all__ = ["BATCH_SIZE", "FANOUT_SECONDS", "Histogram", "cumulative"]

BATCH_SIZE = "router_batch_size"
"""Entries a router read in one go (one XREADGROUP over its partitions)."""

FANOUT_SECONDS = "router_fanout_seconds"
"""From a publish reaching Redis to its fan-out into the subscribers' inboxes (Redis clock)."""

BOUNDS: dict[str, tuple[float, ...]] = {
    BATCH_SIZE: (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
    FANOUT_SECONDS: (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
}
"""Bucket bounds per histogram; the readers use the same ones."""


def _label(bound: float) -> str:
    return repr(float(bound))


class Histogram:
    """Observations of one quantity, counted per bucket until cleared."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.bounds = BOUNDS[name]  # the readers (cumulative) use the same ones
        self._counts = [0] * (len(self.bounds) + 1)
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float, times: int = 1) -> None:
        """Count ``value`` (``times`` times)."""
        self._counts[bisect_left(self.bounds, value)] += times
        self._sum += value * times
        self._count += times

    def pending(self) -> tuple[dict[str, int], float]:
        """Counts since the last :meth:`clear` as hash fields (only the buckets that got any), and
        the sum of the values."""
        if not self._count:
            return {}, 0.0
        labels = [*(_label(b) for b in self.bounds), "+Inf"]
        fields = {f"{self.name}:le:{label}": n for label, n in zip(labels, self._counts, strict=True) if n}
        fields[f"{self.name}:count"] = self._count
        return fields, self._sum

    def clear(self) -> None:
        """Start again from zero (once what :meth:`pending` gave is safely in Redis)."""
        self._counts = [0] * len(self._counts)
        self._sum, self._count = 0.0, 0


def cumulative(fields: Mapping[str, str], name: str) -> tuple[list[tuple[str, float]], float]:
    """Prometheus buckets of histogram ``name`` from the hash's ``fields``: ``(le, observations at
    or below le)`` for every bound and ``+Inf``, and the sum of the observed values."""
    running, out = 0.0, []
    for label in [*(_label(b) for b in BOUNDS[name]), "+Inf"]:
        running += float(fields.get(f"{name}:le:{label}", 0) or 0)
        out.append((label, running))
    return out, float(fields.get(f"{name}:sum", 0) or 0)
