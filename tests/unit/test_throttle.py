"""The per-peer token bucket (coordinator.routing.throttle), on an explicit clock."""

from __future__ import annotations

from coordinator.routing.throttle import Throttle


def test_a_peer_within_its_burst_is_never_held_back() -> None:
    t = Throttle(rate=10, burst=50)
    t.spend("s", 50, now=0.0)
    assert t.resting("s", now=0.0) == 0.0


def test_a_peer_over_its_rate_rests_until_the_bucket_refills() -> None:
    t = Throttle(rate=10, burst=50)
    t.spend("s", 80, now=0.0)  # 30 over: three seconds at ten a second
    assert t.resting("s", now=0.0) == 3.0
    assert t.resting("s", now=2.0) == 1.0
    assert t.resting("s", now=3.0) == 0.0
    assert t.resting("other", now=0.0) == 0.0  # one peer's debt is nobody else's


def test_the_bucket_never_holds_more_than_the_burst() -> None:
    t = Throttle(rate=10, burst=50)
    t.spend("s", 1, now=0.0)
    t.spend("s", 60, now=1000.0)  # a long quiet spell earns no more than the burst
    assert t.resting("s", now=1000.0) == 1.0


def test_no_rate_means_no_limit() -> None:
    t = Throttle(rate=0, burst=1)
    t.spend("s", 10**9, now=0.0)
    assert not t.on and t.resting("s", now=0.0) == 0.0
