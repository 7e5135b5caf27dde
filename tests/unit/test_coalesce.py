"""ReadCoalescer: a reader waits before a read only when a busy stream makes it pay."""

from __future__ import annotations

import pytest

from coordinator.routing.coalesce import HORIZON, MIN_GAIN, ReadCoalescer
from coordinator.routing.router import _awaited

LINGER = 0.0005


def reads(c: ReadCoalescer, start: float, every: float, entries: int, count: int) -> float:
    """Feed ``count`` reads of ``entries`` each, ``every`` seconds apart; returns the last time."""
    now = start
    for _ in range(count):
        now += every
        c.observe(now, entries)
    return now


def test_busy_stream_waits_until_linger_after_the_last_read() -> None:
    c = ReadCoalescer(LINGER, batch_size=512)
    last = reads(c, 0.0, 0.0001, 1, 500)  # one entry every 100 us: 10,000 per second
    assert c.rate == pytest.approx(10_000, rel=0.01)
    assert c.delay(last) == pytest.approx(LINGER)
    # time spent since the read (processing it) counts toward the linger
    assert c.delay(last + 0.0003) == pytest.approx(LINGER - 0.0003)
    assert c.delay(last + 0.001) == 0.0


def test_sparse_traffic_never_waits() -> None:
    c = ReadCoalescer(LINGER, batch_size=512)
    last = reads(c, 0.0, 0.001, 1, 100)  # 1,000 per second: half an entry per linger
    assert c.rate * LINGER < MIN_GAIN
    assert c.delay(last) == 0.0


def test_a_full_batch_reads_again_at_once() -> None:
    c = ReadCoalescer(LINGER, batch_size=64)
    last = reads(c, 0.0, 0.001, 64, 20)  # a backlog: every read comes back full
    assert c.rate * LINGER >= MIN_GAIN
    assert c.delay(last) == 0.0
    c.observe(last + 0.001, 10)  # the backlog is gone but entries still flow fast
    assert c.delay(last + 0.001) > 0


def test_rate_decays_when_the_stream_goes_quiet() -> None:
    c = ReadCoalescer(LINGER, batch_size=512)
    last = reads(c, 0.0, 0.0001, 1, 500)
    assert c.delay(last) > 0
    last = reads(c, last, 0.05, 0, 1)  # one blocking read that timed out empty
    assert c.delay(last) == 0.0


def test_sparse_messages_after_a_burst_do_not_wait() -> None:
    c = ReadCoalescer(LINGER, batch_size=512)
    last = reads(c, 0.0, 0.001, 512, 20)  # a backlog drained at 512,000 entries per second
    last = reads(c, last, 0.001, 100, 1)  # its tail
    assert c.delay(last) > 0
    last = reads(c, last, 0.1, 1, 1)  # then one message after 100 ms of quiet
    assert c.delay(last) == 0.0


def test_zero_linger_turns_it_off_and_negative_is_refused() -> None:
    c = ReadCoalescer(0.0, batch_size=512)
    last = reads(c, 0.0, 0.00001, 5, 500)
    assert c.delay(last) == 0.0
    assert ReadCoalescer(LINGER, 512).delay(0.0) == 0.0  # nothing observed yet
    with pytest.raises(ValueError, match="linger"):
        ReadCoalescer(-1.0, 512)


def test_a_conversation_reads_again_at_once_for_a_horizon() -> None:
    c = ReadCoalescer(LINGER, batch_size=512)
    last = reads(c, 0.0, 0.0001, 1, 500)  # busy enough to linger...
    assert c.delay(last) > 0
    c.converse(last)  # ...but that read held a request or an answer
    assert c.delay(last) == 0.0
    assert c.delay(last + HORIZON / 2) == 0.0
    later = reads(c, last + HORIZON, 0.0001, 1, 200)  # the conversation is over, the stream is not
    assert c.rate * LINGER > 2 * MIN_GAIN
    assert c.delay(later) > 0


def test_what_the_router_counts_as_a_conversation() -> None:
    assert _awaited({"k": "pub", "t": "a.b", "rt": "alice"})  # a request
    assert _awaited({"k": "rep", "ri": "01H", "to": "alice"})  # an answer
    assert _awaited({"k": "sub", "r": "r1", "t": "a.>"})  # a control call waits for its reply
    assert not _awaited({"k": "hb", "r": "r2"})  # signed heartbeats: nobody waits on their speed
    assert not _awaited({"k": "pub", "t": "a.b", "d": "1"})  # plain publishes are coalesced
    assert not _awaited({"k": "pubs", "b": "[]"})
