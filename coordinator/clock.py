"""Redis server time: the one clock the sidecar trusts (peer and worker clocks never matter)."""

from __future__ import annotations

from typing import Any

__all__ = ["redis_ms", "time_reply_ms"]


def time_reply_ms(reply: Any) -> int:
    """Milliseconds since the epoch from a Redis ``TIME`` reply (``[seconds, microseconds]``)."""
    sec, usec = reply
    return int(sec) * 1000 + int(usec) // 1000


def redis_ms(client: Any) -> int:
    """Redis server time in milliseconds, read with one ``TIME`` on a sync client."""
    return time_reply_ms(client.time())
