"""Per-peer rate limits in hardened mode: a token bucket per peer's own request stream.

A peer over its rate is not refused anything: the router stops reading its stream until the
bucket refills, so its requests wait there (back-pressure, nothing lost) while everyone else's
flow. The stream itself is capped (``peer_backlog``, the router's trim): past the cap the oldest
entries go and are counted, so a flood costs Redis a bounded amount of memory.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Throttle"]


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class Throttle:
    """Token buckets of ``rate`` messages a second and ``burst`` at once, per stream."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._buckets: dict[str, _Bucket] = {}

    @property
    def on(self) -> bool:
        return self.rate > 0

    def spend(self, stream: str, messages: int, now: float) -> None:
        """``messages`` were read from ``stream`` at ``now`` (the bucket may go below zero: a
        read takes at most a batch, so it overshoots by a batch at most)."""
        if not self.on:
            return
        bucket = self._refill(stream, now)
        bucket.tokens -= messages

    def resting(self, stream: str, now: float) -> float:
        """Seconds until ``stream`` may be read again (0: now)."""
        if not self.on or stream not in self._buckets:
            return 0.0
        bucket = self._refill(stream, now)
        return 0.0 if bucket.tokens >= 0 else -bucket.tokens / self.rate

    def _refill(self, stream: str, now: float) -> _Bucket:
        bucket = self._buckets.get(stream)
        if bucket is None:
            bucket = self._buckets[stream] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        return bucket

    def forget(self, keep: set[str]) -> None:
        """Drop the buckets of streams not in ``keep`` (peers revoked)."""
        for stream in list(self._buckets):
            if stream not in keep:
                del self._buckets[stream]
