"""Message ids: made by the publisher, unique per message, kept across retries, sites and bridges.

An id is a ULID (26 characters of Crockford base32: 48 bits of milliseconds, then 80 bits that are
random at the first id of each millisecond and count up within it), so ids sort by publish time
within a publisher and never collide across publishers. Repeats are dropped by ``(sender, id)``.
"""

from __future__ import annotations

import re
import secrets
import time

__all__ = ["MESSAGE_ID_RE", "MessageIds"]

MESSAGE_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
"""What a message id may look like (ours are ULIDs; a bridge or a plain client may bring others)."""

_CROCKFORD = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_RANDOM_MAX = (1 << 80) - 1


_PAIRS = [chr(_CROCKFORD[i >> 5]) + chr(_CROCKFORD[i & 31]) for i in range(1024)]
"""The last two characters of an id for each value of its random part's low 10 bits."""


class MessageIds:
    """Monotonic ULIDs for one publisher (not thread-safe: one per event loop).

    The first 24 characters change once per millisecond or per 1,024 ids, so an id usually costs a
    clock read, a table lookup and one string concatenation.
    """

    __slots__ = ("_head", "_ms", "_random")

    def __init__(self) -> None:
        self._ms = -1
        self._head = ""
        self._random = 0

    def next(self) -> str:
        """A new id, greater than every id this generator made before."""
        ms = time.time_ns() // 1_000_000
        if ms > self._ms:
            self._ms = ms
            self._random = secrets.randbits(79)  # room to count up within the millisecond
            self._head = _head(ms, self._random)
        else:
            self._random += 1
            if self._random > _RANDOM_MAX:  # 2**79 ids in one millisecond: borrow the next one
                self._ms += 1
                self._random = 0
                self._head = _head(self._ms, 0)
            elif not self._random & 1023:
                self._head = _head(self._ms, self._random)
        return self._head + _PAIRS[self._random & 1023]


def _head(ms: int, random: int) -> str:
    """The first 24 characters of a ULID: ``ms`` in 10, then the random part's top 70 bits in 14."""
    value = (ms << 70) | (random >> 10)
    out = bytearray(24)
    for i in range(23, -1, -1):
        out[i] = _CROCKFORD[value & 31]
        value >>= 5
    return out.decode()
