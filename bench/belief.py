"""Leadership as the peers believe it: sampled ``is_leader`` intervals and their overlaps.

The Redis leader record (sampled by ``bench.ha``) can never name two leaders for one term; what a
user's code acts on is the peer's own ``is_leader``. :class:`BeliefSampler` samples it, with
``leader_term``, every few milliseconds in the peer's event loop and turns the samples into
intervals (peer, term, start, end) on ``time.monotonic()``, which is CLOCK_MONOTONIC and so shared
by every process on this machine. An interval starts at the first sample that saw the belief and
ends at the first sample that no longer did, so it covers the belief (to within one period).

:func:`overlaps` finds every stretch where two peers believed at once and explains it by the
documented window: a leader whose heartbeat has not been confirmed within ``member_ttl`` stops
calling itself leader. A deposed leader's last confirmed heartbeat came before the election of its
successor, and so before the successor's belief started; its belief may therefore outlast the
successor's start by at most ``member_ttl`` (plus the sampling slack). Anything beyond that, and
any overlap of two peers claiming the *same* term, is ``outside_ttl_ms``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

__all__ = ["PERIOD_S", "BeliefSampler", "Interval", "Overlap", "overlaps"]

PERIOD_S = 0.005
"""How often a sampler reads ``is_leader``."""


class _Leaderish(Protocol):
    @property
    def is_leader(self) -> bool: ...

    @property
    def leader_term(self) -> int: ...


@dataclass
class Interval:
    """``peer`` believed it led ``term`` from ``start`` to ``end`` (None: still believes)."""

    peer: str
    term: int
    start: float
    end: float | None = None


@dataclass(frozen=True)
class Overlap:
    """Two peers believed they led at once for ``length_ms``, from ``start``."""

    run: str
    peers: tuple[str, str]
    terms: tuple[int, int]
    """(older term, newer term): the deposed leader's and its successor's."""
    start: float
    length_ms: float
    ttl_s: float
    after_successor_start_ms: float
    """How long the older belief lasted past the successor's start (the TTL window bounds it)."""
    outside_ttl_ms: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class BeliefSampler:
    """Samples each peer given by ``peers()`` every ``period`` s; ``intervals`` holds the result.

    ``on_change(kind, interval)`` (if given) is called with ``"start"`` or ``"end"`` as each interval
    opens and closes, so a peer process can write them out as they happen.
    """

    def __init__(self, peers: Callable[[], Iterable[tuple[str, _Leaderish]]], *,
                 period: float = PERIOD_S,
                 on_change: Callable[[str, Interval], None] | None = None) -> None:
        self._peers = peers
        self.period = period
        self.on_change = on_change
        self.intervals: list[Interval] = []
        self._open: dict[str, Interval] = {}
        self.samples = 0

    def sample(self, now: float | None = None) -> None:
        """Read every peer's belief once."""
        now = time.monotonic() if now is None else now
        self.samples += 1
        seen: set[str] = set()
        for name, peer in self._peers():
            seen.add(name)
            leads = peer.is_leader
            term = peer.leader_term if leads else 0
            current = self._open.get(name)
            if current is not None and (not leads or current.term != term):
                self._close(name, now)
                current = None
            if leads and current is None:
                interval = Interval(name, term, now)
                self._open[name] = interval
                self.intervals.append(interval)
                if self.on_change is not None:
                    self.on_change("start", interval)
        for name in [n for n in self._open if n not in seen]:  # a peer no longer listed is gone
            self._close(name, now)

    def _close(self, name: str, now: float) -> None:
        interval = self._open.pop(name)
        interval.end = now
        if self.on_change is not None:
            self.on_change("end", interval)

    def close_all(self, now: float | None = None) -> None:
        """End every open interval (the peers are stopping)."""
        now = time.monotonic() if now is None else now
        for name in list(self._open):
            self._close(name, now)

    async def run(self, stop: asyncio.Event) -> None:
        """Sample until ``stop`` is set, then close what is open."""
        next_at = time.monotonic()
        while not stop.is_set():
            self.sample()
            next_at += self.period
            delay = next_at - time.monotonic()
            if delay < 0:  # the loop was busy: sample again as soon as it can, no catching up
                next_at = time.monotonic()
                delay = 0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()
        self.close_all()


def overlaps(run: str, intervals: list[Interval], ttl_s: float, end: float,
             slack_s: float = 2 * PERIOD_S) -> list[Overlap]:
    """Every stretch two intervals of different peers share (open intervals end at ``end``)."""
    spans = sorted(((i.peer, i.term, i.start, i.end if i.end is not None else end)
                    for i in intervals), key=lambda s: s[2])
    out: list[Overlap] = []
    for k, (peer_a, term_a, start_a, end_a) in enumerate(spans):
        for peer_b, term_b, start_b, end_b in spans[k + 1:]:
            if start_b >= end_a:
                break
            if peer_a == peer_b:
                continue
            lo, hi = max(start_a, start_b), min(end_a, end_b)
            if hi <= lo:
                continue
            if term_a == term_b:  # one term, two leaders: nothing explains that
                outside = hi - lo
                older, newer = (term_a, start_a), (term_b, start_b)
            else:
                older, newer = sorted(((term_a, start_a), (term_b, start_b)))
                # the older term's belief may last until the successor's start plus the TTL
                outside = max(0.0, hi - max(lo, newer[1] + ttl_s + slack_s))
            older_peer, newer_peer = ((peer_a, peer_b) if older == (term_a, start_a)
                                      else (peer_b, peer_a))
            out.append(Overlap(run, (older_peer, newer_peer), (older[0], newer[0]), lo,
                               (hi - lo) * 1e3, ttl_s, max(0.0, hi - newer[1]) * 1e3,
                               outside * 1e3))
    return out
