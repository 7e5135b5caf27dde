"""How much each scenario measures (full and quick plans) and the targets the issue sets."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FULL", "NOTES", "QUICK", "TARGETS", "Plan", "Target"]


@dataclass(frozen=True)
class Plan:
    """Message counts and repetitions of one run. Throughput reps alternate with the raw anchor."""

    name: str
    reps: int
    """Repetitions of every throughput scenario; each figure is the median over them."""
    raw_msgs: int
    route_msgs: int
    pipelined_msgs: int
    pipeline_chunk: int
    """Publishes in flight at once (one ``asyncio.gather``) in the pipelined scenario, and LPUSHes
    in flight at once (one write) in the pipelined raw hop it is compared with."""
    celery_tasks: int
    fanout_msgs: int
    fanout_procs: int
    fanout_peers_per_proc: int
    latency_msgs: int
    latency_rate: float
    """Messages per second of the paced latency scenarios (well below saturation)."""
    latency_reps: int
    warmup_fraction: float
    """Counts of the unrecorded warm-up round, as a fraction of the measured counts."""
    match_seconds: float
    """Minimum time of one SubscriptionIndex timing repetition."""
    match_repeats: int
    match_sizes: tuple[int, ...]
    """Index sizes timed: 10 and 10,000 carry the target, any others show the trend."""
    idle_peers: int
    idle_procs: int
    settle_s: float
    """Least wait before reading Redis memory, so heartbeats and replies have landed."""
    settle_max_s: float
    """Longest wait for Redis memory to become steady."""
    scenario_timeout_s: float
    """Bound on one scenario repetition, processes included."""
    rpc_msgs: int = 2_000
    """Requests of one request/reply (and raw round trip) run, and messages of a queue group run."""
    rpc_reps: int = 3
    queue_members: int = 4
    failover_reps: int = 3
    """SIGKILLs of the leader, with default and with tuned timings each."""
    beat_ha_s: float = 15.0
    """How long two beats run under membership churn (the beat is killed halfway)."""
    policy_peers: int = 1_000
    policy_procs: int = 4
    nats_msgs: int = 5_000
    """Messages of one raw NATS run and of one cross-site run (both awaited one at a time)."""
    jetstream_msgs: int = 50_000
    """Messages of one raw JetStream run (batched acknowledgements both ways)."""
    catch_up_msgs: int = 50_000
    """Messages a site misses and catches up on."""
    federation_reps: int = 3
    """Repetitions of the cross-site runs (each alternating with its anchor) and of the failover."""

    @property
    def fanout_peers(self) -> int:
        """Subscriber peers of the fan-out scenario."""
        return self.fanout_procs * self.fanout_peers_per_proc


FULL = Plan(name="full", reps=5, raw_msgs=8_000, route_msgs=8_000, pipelined_msgs=30_000,
            pipeline_chunk=2_000, celery_tasks=3_000, fanout_msgs=1_000, fanout_procs=4,
            fanout_peers_per_proc=25, latency_msgs=3_000, latency_rate=1_000.0, latency_reps=3,
            warmup_fraction=0.1, match_seconds=0.3, match_repeats=5,
            match_sizes=(10, 1_000, 10_000, 100_000), idle_peers=200, idle_procs=4,
            settle_s=2.0, settle_max_s=20.0, scenario_timeout_s=60.0)

QUICK = Plan(name="quick", reps=1, raw_msgs=200, route_msgs=200, pipelined_msgs=1_000,
             pipeline_chunk=250, celery_tasks=50, fanout_msgs=20, fanout_procs=2,
             fanout_peers_per_proc=5, latency_msgs=100, latency_rate=1_000.0, latency_reps=1,
             warmup_fraction=0.0, match_seconds=0.02, match_repeats=2,
             match_sizes=(10, 10_000), idle_peers=10, idle_procs=1,
             settle_s=0.5, settle_max_s=3.0, scenario_timeout_s=30.0, failover_reps=1,
             beat_ha_s=4.0, policy_peers=50, policy_procs=1, rpc_msgs=50, rpc_reps=1,
             nats_msgs=100, jetstream_msgs=500, catch_up_msgs=500, federation_reps=1)


@dataclass(frozen=True)
class Target:
    """A bound the issue sets on one figure: ``figure op value``."""

    figure: str
    op: str
    """``">="`` or ``"<="``."""
    value: float

    def check(self, measured: float | None) -> bool:
        """Whether ``measured`` meets the target (a missing figure never does)."""
        if measured is None:
            return False
        return measured >= self.value if self.op == ">=" else measured <= self.value


TARGETS = (
    Target("route_vs_raw_throughput", ">=", 0.9),
    Target("route_vs_raw_p50", "<=", 2.5),
    Target("route_vs_celery_throughput", ">=", 7.0),
    Target("route_pipelined_vs_raw_pipelined", ">=", 0.5),
    Target("match_cost_ratio_10000_vs_10", "<=", 1.5),
    Target("failover_s", "<=", 4.0),
    Target("failover_tuned_s", "<=", 1.0),
    Target("beat_takeover_s", "<=", 2.0),
    Target("dual_leader_samples", "<=", 0.0),
    Target("dual_leader_belief_outside_ttl_ms", "<=", 0.0),
    Target("policy_convergence_1000_peers_s", "<=", 2.0),
    Target("route_secure_vs_raw_throughput", ">=", 0.8),
    Target("request_reply_p50_vs_raw_rtt", "<=", 2.5),
    Target("queue_group_vs_route_throughput", ">=", 1.0),
    Target("cross_site_vs_route_throughput", ">=", 0.8),
    Target("cross_site_p50_vs_budget", "<=", 1.0),
    Target("catch_up_vs_raw_jetstream", ">=", 0.5),
    Target("cross_site_failover_s", "<=", 5.0),
)
"""The issue's targets. Every ratio names its strongest anchor: ``raw`` is the fastest (for
latency: the quickest) of the three raw hops, ``celery`` Celery at its default configuration,
``raw_pipelined`` the raw hop with as many pushes in flight as the pipelined route run."""

NOTES = {
    "raw_hop_msgs_per_s": "fastest of the raw hops (the anchor of every raw ratio)",
    "raw_hop_p50_us": "quickest raw hop, paced like the route run",
    "celery_task_msgs_per_s": "Celery's default configuration (the anchor)",
    "redis_used_memory_per_idle_peer": "the memory figure: measured, target comes with connection "
                                       "sharing",
    "dual_leader_belief_ms": "two peers' is_leader at once (see outside_ttl)",
    "route_via_router_vs_raw_throughput": "every publish through the router (SIDECAR_DATA_PATH="
                                          "routed), as before the direct path (no target)",
    "route_pipelined_vs_raw": "legacy: pipelined route over the one-at-a-time raw hop (no target)",
    "route_vs_raw_async_throughput": "legacy: against the redis-py asyncio hop (no target)",
    "route_vs_raw_async_p50": "legacy: against the redis-py asyncio hop (no target)",
    "route_vs_celery_project_config_throughput": "legacy: against the project's Celery "
                                                 "configuration (no target)",
    "match_cost_ratio_10000_vs_10_same_answer": "legacy: same answer from both indexes (no target)",
    "redis_bytes_per_idle_peer": "legacy: key sizes only, connections left out (no target)",
    "cross_site_p50_vs_budget": "cross_site_p50_us over 2 x route_p50_us + raw_nats_p50_us",
    "raw_nats_msgs_per_s": "nats-py, a flush awaited after every publish (the anchor of the NATS hop)",
    "raw_jetstream_msgs_per_s": "nats-py, JetStream acknowledgements batched both ways",
    "raw_jetstream_p50_us": "nats-py, paced: stored in a stream, then pushed to a durable consumer "
                            "(context: the hop a site's messages take; not in the budget)",
    "cross_site_p50_vs_stored_budget": "context, no target: the budget with the JetStream hop in "
                                       "place of core NATS (2 x route_p50_us + raw_jetstream_p50_us)",
}
"""What a figure without a target is, or which anchor a targeted figure stands on."""
