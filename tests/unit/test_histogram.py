"""Histograms counted in memory, flushed as hash fields, read back as Prometheus buckets."""

from __future__ import annotations

from coordinator.histogram import BATCH_SIZE, FANOUT_SECONDS, Histogram, cumulative


def test_pending_counts_per_bucket_until_cleared() -> None:
    h = Histogram(BATCH_SIZE)
    for size in (1, 1, 3, 1000, 5000):
        h.observe(size)
    assert h.pending() == h.pending()  # kept until the flush went through
    fields, total = h.pending()
    assert fields == {"router_batch_size:le:1.0": 2, "router_batch_size:le:5.0": 1,
                      "router_batch_size:le:1000.0": 1, "router_batch_size:le:+Inf": 1,
                      "router_batch_size:count": 5}
    assert total == 6005
    h.clear()
    assert h.pending() == ({}, 0.0)  # nothing since


def test_cumulative_buckets_add_up_what_several_processes_wrote() -> None:
    first, second = Histogram(FANOUT_SECONDS), Histogram(FANOUT_SECONDS)
    first.observe(0.0004)
    first.observe(0.003, times=2)
    second.observe(7.0)
    stored: dict[str, str] = {}
    for h in (first, second):  # as HINCRBY / HINCRBYFLOAT add them in Redis
        fields, total = h.pending()
        h.clear()
        for field, n in fields.items():
            stored[field] = str(int(stored.get(field, 0)) + n)
        stored[f"{FANOUT_SECONDS}:sum"] = str(float(stored.get(f"{FANOUT_SECONDS}:sum", 0)) + total)
    buckets, total = cumulative(stored, FANOUT_SECONDS)
    counts = dict(buckets)
    assert counts["0.0005"] == 1 and counts["0.0025"] == 1 and counts["0.005"] == 3
    assert counts["5.0"] == 3 and counts["+Inf"] == 4 == int(stored[f"{FANOUT_SECONDS}:count"])
    assert [n for _, n in buckets] == sorted(n for _, n in buckets)  # cumulative
    assert abs(total - (0.0004 + 0.006 + 7.0)) < 1e-9
