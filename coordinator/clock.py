"""Redis server time: the one clock the sidecar trusts (peer and worker clocks never matter)."""

from __future__ import annotations

from typing import Any

__all__ = ["offset_ms", "redis_ms", "time_reply_ms"]


def time_reply_ms(reply: Any) -> int:
    """Milliseconds since the epoch from a Redis ``TIME`` reply (``[seconds, microseconds]``)."""
    sec, usec = reply
    return int(sec) * 1000 + int(usec) // 1000


def redis_ms(client: Any) -> int:
    """Redis server time in milliseconds, read with one ``TIME`` on a sync client."""
    return time_reply_ms(client.time())


def offset_ms(redis_now_ms: float, sent: float, received: float) -> float:
    """Redis time minus this process's clock (ms), from Redis's time ``redis_now_ms`` read by a
    call sent at ``sent`` and answered at ``received`` (``time.time()`` seconds): Redis read its
    clock halfway through the round trip, as far as this process can tell."""
    return redis_now_ms - (sent + received) * 500
