"""The benchmark's code path runs end to end (tiny counts) and reports every figure as a number.

No timing is judged here: the figures of a quick run on a shared machine mean nothing. Targets
are checked by `make bench`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

FIGURES = ("raw_hop_msgs_per_s", "raw_hop_p50_us", "celery_task_msgs_per_s", "route_msgs_per_s",
           "route_p50_us", "route_p99_us", "route_pipelined_msgs_per_s",
           "fanout100_deliveries_per_s", "match_us_10_subs", "match_us_10000_subs",
           "redis_bytes_per_idle_peer", "route_vs_raw_throughput", "route_vs_raw_p50",
           "route_vs_celery_throughput", "match_cost_ratio_10000_vs_10", "route_secure_msgs_per_s",
           "route_secure_vs_raw_throughput", "failover_s", "failover_tuned_s", "detection_s",
           "beat_takeover_s", "dual_leader_samples", "policy_convergence_50_peers_s",
           "raw_hop_lean_msgs_per_s", "raw_hop_sync_msgs_per_s", "raw_hop_async_msgs_per_s",
           "raw_pipelined_msgs_per_s", "route_pipelined_vs_raw_pipelined",
           "celery_task_project_config_msgs_per_s", "redis_used_memory_per_idle_peer",
           "dual_leader_belief_ms", "dual_leader_belief_outside_ttl_ms", "raw_nats_msgs_per_s",
           "raw_nats_p50_us", "raw_jetstream_msgs_per_s", "cross_site_msgs_per_s", "cross_site_p50_us",
           "catch_up_msgs_per_s", "cross_site_failover_s", "cross_site_vs_route_throughput",
           "cross_site_p50_vs_budget", "catch_up_vs_raw_jetstream", "raw_jetstream_p50_us",
           "cross_site_p50_vs_stored_budget")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_benchmark_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    run = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["meta"]["errors"] == [], results["meta"]["errors"]
    missing = [f for f in FIGURES if not isinstance(results.get(f), int | float)]
    assert not missing, f"figures missing from the quick run: {missing}"
    assert results["dual_leader_samples"] == 0
    assert results["dual_leader_belief_outside_ttl_ms"] == 0  # overlaps only inside the TTL window
    assert set(results["targets"]) >= {"route_vs_raw_throughput", "failover_s",
                                       "policy_convergence_1000_peers_s", "cross_site_failover_s"}
