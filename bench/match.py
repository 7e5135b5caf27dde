"""Cost of ``SubscriptionIndex.match`` with 10 and with 10,000 subscriptions (and more), in process.

Subscriptions look like a real deployment's: topics ``<app>.<entity>.<id>.<event>``; most patterns
are literal topics, some end in ``*`` or ``>``, some have ``*`` in the middle, and 2,000 peers share
them. The small index is the first ten subscriptions of the large one. The probe topics come from
the same distribution (so most subscriptions do not match a probe) and are the same for every size.
Timings alternate between the sizes; each figure is the median over the repetitions.

Two workloads. *mixed* (the target figure, ``match_us_<n>_subs`` and
``match_cost_ratio_10000_vs_10``): the index of size N is the first N subscriptions of that
distribution, so a larger index also matches more (13.5 hits per probe at 10,000) and builds a
larger answer, while with 10 subscriptions most probes stop at the root (nothing shares their first
token). That is what a router's index costs as a deployment grows, answers included.
*same answer* (``match_us_<n>_subs_same_answer``, no target): both indexes hold the same ten
subscriptions (literal, ``*`` and ``>`` patterns), the large one adds 9,990 realistic subscriptions
that match none of the probes, and every probe is a topic those ten match, so each probe gets the
same answer from either index. Its ratio is the price of the extra subscriptions alone, which
flatters the design (the figure the benchmark used to carry the target with).
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from dataclasses import dataclass

from coordinator.topics import SubscriptionIndex, matches

__all__ = ["MatchTiming", "build_index", "measure_match", "probe_topics", "same_answer_workload",
           "subscriptions"]

APPS = ("orders", "billing", "users", "inventory", "shipping", "search", "auth", "media", "chat",
        "metrics")
ENTITIES = ("item", "account", "session", "invoice", "cart", "profile", "device", "job")
EVENTS = ("created", "updated", "deleted", "viewed", "failed", "retried")
IDS = 1_000
PEERS = 2_000


@dataclass(frozen=True)
class MatchTiming:
    """Timing of one index size: median microseconds per call, every repetition, hits per probe."""

    us: float
    runs: list[float]
    mean_matches: float


def _topic(rng: random.Random) -> str:
    return (f"{rng.choice(APPS)}.{rng.choice(ENTITIES)}.{rng.randrange(IDS)}."
            f"{rng.choice(EVENTS)}")


def _pattern(rng: random.Random) -> str:
    app, entity, ident, event = _topic(rng).split(".")
    roll = rng.random()
    if roll < 0.70:
        return f"{app}.{entity}.{ident}.{event}"
    if roll < 0.85:
        return f"{app}.{entity}.{ident}.*"
    if roll < 0.92:
        return f"{app}.{entity}.*.{event}"
    if roll < 0.97:
        return f"{app}.{entity}.{ident}.>"
    return f"{app}.{entity}.>" if roll < 0.99 else f"{app}.>"


def subscriptions(count: int, seed: int = 7) -> list[tuple[str, str]]:
    """``count`` distinct (peer, pattern) pairs; a smaller count is a prefix of a larger one."""
    rng = random.Random(seed)
    out: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    while len(out) < count:
        pair = (f"peer{rng.randrange(PEERS)}", _pattern(rng))
        if pair not in seen:
            seen.add(pair)
            out.append(pair)
    return out


def probe_topics(count: int = 200, seed: int = 11) -> list[str]:
    """Literal topics to match, from the subscriptions' distribution."""
    rng = random.Random(seed)
    return [_topic(rng) for _ in range(count)]


def build_index(count: int) -> SubscriptionIndex:
    """An index holding the first ``count`` subscriptions."""
    return SubscriptionIndex(subscriptions(count))


def same_answer_workload(sizes: tuple[int, ...]) -> tuple[dict[int, SubscriptionIndex], list[str]]:
    """Indexes of each size and probes that every index answers alike (see module docstring)."""
    rng = random.Random(3)
    hits: list[tuple[str, str]] = []
    for k, topic in enumerate(probe_topics(10, seed=5)):
        app, entity, ident, event = topic.split(".")
        pattern = (topic, f"{app}.{entity}.{ident}.*", f"{app}.{entity}.*.{event}",
                   f"{app}.{entity}.>")[k % 4]
        hits.append((f"hit{k}", pattern))
    candidates = probe_topics(20_000, seed=13) + [
        f"{p.replace('.*', f'.{rng.choice(EVENTS)}').replace('.>', '.x.y')}" for _, p in hits]
    probes = [t for t in candidates if any(matches(p, t) for _, p in hits)][:200]
    filler = [(peer, pattern) for peer, pattern in subscriptions(max(sizes) * 2, seed=23)
              if not any(matches(pattern, t) for t in probes)]
    out = {}
    for n in sizes:
        index = SubscriptionIndex(hits[:min(n, 10)] + filler[:max(0, n - 10)])
        assert len(index) == n, f"not enough non-matching subscriptions for {n}"
        out[n] = index
    return out, probes


def _time_once(index: SubscriptionIndex, probes: list[str], seconds: float) -> float:
    """Microseconds per ``match`` call, looping over ``probes`` for at least ``seconds``."""
    match = index.match
    calls = 0
    start = time.perf_counter_ns()
    budget = int(seconds * 1e9)
    while True:
        for topic in probes:
            match(topic)
        calls += len(probes)
        elapsed = time.perf_counter_ns() - start
        if elapsed >= budget:
            return elapsed / calls / 1e3


def measure_match(seconds: float, repeats: int, sizes: tuple[int, ...] = (10, 10_000), *,
                  same_answer: bool = False) -> dict[int, MatchTiming]:
    """A :class:`MatchTiming` per index size (number of subscriptions), either workload."""
    if same_answer:
        indexes, probes = same_answer_workload(sizes)
    else:
        indexes, probes = {n: build_index(n) for n in sizes}, probe_topics()
    runs: dict[int, list[float]] = {n: [] for n in sizes}
    for index in indexes.values():  # warm up
        _time_once(index, probes, seconds / 10)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            for n, index in indexes.items():
                runs[n].append(_time_once(index, probes, seconds))
    finally:
        if gc_was_enabled:
            gc.enable()
    return {n: MatchTiming(statistics.median(runs[n]), runs[n],
                           sum(len(indexes[n].match(t)) for t in probes) / len(probes))
            for n in sizes}
