"""The schedule of one benchmark run, and the figures it derives.

1. ``SubscriptionIndex.match`` timings (in process, before any server runs).
2. Redis and one worker per scenario namespace; a warm-up round that is not recorded.
3. ``reps`` rounds, each measuring raw, route, pipelined, Celery and fan-out throughput in turn,
   so every throughput figure alternates with its anchor (the machine's speed drifts). The raw,
   route and secure runs also report CPU per message of each process on the path (publisher,
   subscribers, router, Redis): on a CPU-bound machine that explains the throughput ratios.
4. Paced latency rounds, raw then route, at the same rate.
5. Redis memory of idle peers.

A failed scenario repetition is recorded under ``meta.errors`` and the run carries on; a figure
with no successful repetition is reported as missing (null) and fails its target.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from bench.celery_anchor import run_celery
from bench.ha import run_beat_ha, run_failover
from bench.match import measure_match
from bench.memory import run_idle_memory
from bench.plan import Plan
from bench.policy_conv import run_policy_convergence
from bench.raw import run_raw
from bench.report import median, percentile, ratio, targets_section
from bench.route import run_route
from bench.services import Services

__all__ = ["SCENARIOS", "Run"]

log = logging.getLogger("bench")
SCENARIOS = ["route", "secure", "pipelined", "fanout", "celery", "latency", "idle"]
"""One namespace and one worker each."""


class Run:
    """One benchmark run under ``plan``; :meth:`execute` returns the results object."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.started = time.monotonic()
        self.runs: dict[str, list[float]] = {}
        self.errors: list[str] = []
        self.extra: dict[str, float] = {}
        self.load_start = os.getloadavg()

    # ------------------------------------------------------------------ bookkeeping
    def say(self, text: str) -> None:
        """Progress on stderr, stamped with the run's elapsed time."""
        print(f"[{time.monotonic() - self.started:6.1f}s] {text}", file=sys.stderr, flush=True)

    def record(self, key: str, value: float | None) -> None:
        """Append one repetition's value to ``runs[key]`` (missing values are skipped)."""
        if value is not None:
            self.runs.setdefault(key, []).append(value)

    def attempt(self, label: str, call: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """Run one scenario repetition; on failure note it and return None."""
        try:
            return call()
        except Exception as exc:
            self.errors.append(f"{label}: {exc}")
            self.say(f"{label} FAILED: {exc}")
            log.debug("%s", traceback.format_exc())
            return None

    # ------------------------------------------------------------------ schedule
    def execute(self) -> dict[str, Any]:
        """Run every scenario (see the module docstring) and derive the figures."""
        p = self.plan
        cpus = os.cpu_count() or 1
        if self.load_start[0] > cpus / 2:
            self.say(f"WARNING: load average {self.load_start[0]:.1f} on {cpus} CPUs: "
                     "other work competes with the benchmark, expect noisy figures")
        self.say(f"plan {p.name}: matching against {p.match_sizes} subscriptions")
        same = measure_match(p.match_seconds, p.match_repeats, p.match_sizes, same_answer=True)
        for size, timing in same.items():
            self.runs[f"match_us_{size}_subs"] = timing.runs
            self.extra[f"match_mean_hits_{size}_subs"] = timing.mean_matches
        mixed = measure_match(p.match_seconds, p.match_repeats, p.match_sizes)
        for size, timing in mixed.items():
            self.runs[f"match_us_{size}_subs_mixed"] = timing.runs
            self.extra[f"match_mean_hits_{size}_subs_mixed"] = timing.mean_matches
        self.say("starting Redis and one worker per scenario namespace")
        with Services(SCENARIOS) as svc:
            self.say(f"Redis at {svc.url}; workers log to {svc.dir}")
            if p.warmup_fraction > 0:
                self.throughput_round(svc, "warm-up", p.warmup_fraction, record=False)
            for rep in range(p.reps):
                self.throughput_round(svc, f"rep {rep + 1}/{p.reps}", 1.0, record=True)
            for rep in range(p.latency_reps):
                self.latency_round(svc, f"latency {rep + 1}/{p.latency_reps}")
            self.say(f"idle memory: {p.idle_peers} peers in {p.idle_procs} processes")
            idle = self.attempt("idle memory", lambda: run_idle_memory(
                svc.url, svc.namespace("idle"), p.idle_peers, p.idle_procs, p.settle_s,
                p.settle_max_s, p.scenario_timeout_s))
            if idle is not None:
                self.extra.update(idle)
            self.availability(svc)
        return self.results()

    def availability(self, svc: Services) -> None:
        """Failover, detection, beat takeover, dual-leader checks and policy convergence."""
        p = self.plan
        tuned: dict[str, Any] = {"heartbeat_interval": 0.2, "member_ttl": 0.6}
        default: dict[str, Any] = {}
        for rep in range(p.failover_reps):
            for suffix, settings in (("", default), ("_tuned", tuned)):
                res = self.attempt(f"failover{suffix} {rep + 1}", functools.partial(
                    run_failover, svc.url, settings, p.scenario_timeout_s))
                if res is not None:
                    self.record(f"failover{suffix}_s", res["failover_s"])
                    self.record(f"detection{suffix}_s", res["detection_s"])
        self.say(f"failover: {self.runs.get('failover_s')} tuned {self.runs.get('failover_tuned_s')}")
        beat = self.attempt("two beats", lambda: run_beat_ha(svc.url, tuned, p.beat_ha_s))
        if beat is not None:
            for key, value in beat.items():
                self.record(key, value)
        self.say(f"beat: {beat}")
        conv = self.attempt("policy convergence", lambda: run_policy_convergence(
            svc.url, p.policy_peers, p.policy_procs, p.scenario_timeout_s * 2))
        if conv is not None:
            for key, value in conv.items():
                self.record(key, value)
        self.say(f"policy: {conv}")

    def throughput_round(self, svc: Services, label: str, scale: float, *, record: bool) -> None:
        """Raw, route, pipelined, Celery and fan-out throughput, once each, in that order."""
        p = self.plan
        t = p.scenario_timeout_s

        def n(count: int) -> int:
            return max(10, int(count * scale))

        raw_key = f"bench:{svc.tag}:raw:{_slug(label)}"
        raw = self.attempt(f"{label} raw", lambda: with_cpu(
            svc, None, n(p.raw_msgs), lambda: run_raw(svc.url, raw_key, n(p.raw_msgs), timeout=t)))
        route = self.attempt(f"{label} route", lambda: with_cpu(
            svc, "route", n(p.route_msgs),
            lambda: run_route(svc.url, svc.namespace("route"), n(p.route_msgs), timeout=t)))
        secure = self.attempt(f"{label} route (signed, enforced)", lambda: with_cpu(
            svc, "secure", n(p.route_msgs), lambda: run_route(
                svc.url, svc.namespace("secure"), n(p.route_msgs), timeout=t, secure=True)))
        piped = self.attempt(f"{label} pipelined", lambda: run_route(
            svc.url, svc.namespace("pipelined"), n(p.pipelined_msgs), mode="pipelined",
            chunk=min(p.pipeline_chunk, n(p.pipelined_msgs)), timeout=t))
        celery = self.attempt(f"{label} celery", lambda: run_celery(
            svc.url, svc.namespace("celery"), n(p.celery_tasks), timeout=t))
        fanout = self.attempt(f"{label} fan-out", lambda: run_route(
            svc.url, svc.namespace("fanout"), n(p.fanout_msgs), procs=p.fanout_procs,
            peers_per_proc=p.fanout_peers_per_proc, timeout=t))
        got = {"raw": raw, "route": route, "secure": secure, "pipelined": piped, "celery": celery,
               "fanout": fanout}
        self.say(f"{label}: " + ", ".join(
            f"{k} {v['deliveries_per_s' if k == 'fanout' else 'msgs_per_s']:,.0f}/s"
            for k, v in got.items() if v is not None))
        if not record:
            return
        for name, res in (("raw", raw), ("route", route), ("route_secure", secure)):
            for part, us in (res or {}).get("cpu_us_per_msg", {}).items():
                self.record(f"cpu_us_per_msg_{name}_{part}", us)
        raw_rate = raw["msgs_per_s"] if raw else None
        self.record("raw_hop_msgs_per_s", raw_rate)
        self.record("raw_hop_send_per_s", raw["send_per_s"] if raw else None)
        self.record("route_msgs_per_s", route["msgs_per_s"] if route else None)
        self.record("route_send_per_s", route["send_per_s"] if route else None)
        self.record("route_secure_msgs_per_s", secure["msgs_per_s"] if secure else None)
        self.record("route_secure_vs_raw_throughput",
                    ratio(secure["msgs_per_s"] if secure else None, raw_rate))
        self.record("route_pipelined_msgs_per_s", piped["msgs_per_s"] if piped else None)
        self.record("route_pipelined_send_per_s", piped["send_per_s"] if piped else None)
        self.record("celery_task_msgs_per_s", celery["msgs_per_s"] if celery else None)
        self.record("celery_send_per_s", celery["send_per_s"] if celery else None)
        self.record("fanout100_deliveries_per_s", fanout["deliveries_per_s"] if fanout else None)
        self.record("route_vs_raw_throughput",
                    ratio(route["msgs_per_s"] if route else None, raw_rate))
        self.record("route_pipelined_vs_raw",
                    ratio(piped["msgs_per_s"] if piped else None, raw_rate))

    def latency_round(self, svc: Services, label: str) -> None:
        """Raw then route one-way latency, both paced at ``latency_rate``."""
        p = self.plan
        raw = self.attempt(f"{label} raw", lambda: run_raw(
            svc.url, f"bench:{svc.tag}:lat:{_slug(label)}", p.latency_msgs, rate=p.latency_rate,
            timeout=p.scenario_timeout_s))
        route = self.attempt(f"{label} route", lambda: run_route(
            svc.url, svc.namespace("latency"), p.latency_msgs, mode="paced",
            rate=p.latency_rate, timeout=p.scenario_timeout_s))
        for name, res in (("raw_hop", raw), ("route", route)):
            if res is None:
                continue
            lat_us = [x / 1e3 for x in res["latency_ns"]]
            for q in (50, 99):
                self.record(f"{name}_p{q}_us", percentile(lat_us, q))
        self.say(f"{label}: p50 raw {_us(self.runs.get('raw_hop_p50_us'))}, "
                 f"route {_us(self.runs.get('route_p50_us'))}")

    # ------------------------------------------------------------------ figures
    def results(self) -> dict[str, Any]:
        """The results object: named numbers, then ``targets``, ``runs`` and ``meta``."""
        m = {k: median(v) for k, v in self.runs.items()}
        figures: dict[str, float | None] = {
            "raw_hop_msgs_per_s": m.get("raw_hop_msgs_per_s"),
            "raw_hop_p50_us": m.get("raw_hop_p50_us"),
            "raw_hop_p99_us": m.get("raw_hop_p99_us"),
            "celery_task_msgs_per_s": m.get("celery_task_msgs_per_s"),
            "route_msgs_per_s": m.get("route_msgs_per_s"),
            "route_p50_us": m.get("route_p50_us"),
            "route_p99_us": m.get("route_p99_us"),
            "route_pipelined_msgs_per_s": m.get("route_pipelined_msgs_per_s"),
            "fanout100_deliveries_per_s": m.get("fanout100_deliveries_per_s"),
            "match_us_10_subs": m.get("match_us_10_subs"),
            "match_us_10000_subs": m.get("match_us_10000_subs"),
            "redis_bytes_per_idle_peer": self.extra.get("redis_bytes_per_idle_peer"),
            "route_secure_msgs_per_s": m.get("route_secure_msgs_per_s"),
            "failover_s": m.get("failover_s"),
            "failover_tuned_s": m.get("failover_tuned_s"),
            "detection_s": m.get("detection_s"),
            "detection_tuned_s": m.get("detection_tuned_s"),
            "beat_takeover_s": m.get("beat_takeover_s"),
            "dual_leader_samples": m.get("dual_leader_samples"),
            "leader_samples": m.get("leader_samples"),
            f"policy_convergence_{self.plan.policy_peers}_peers_s":
                m.get(f"policy_convergence_{self.plan.policy_peers}_peers_s"),
        }
        figures.update({
            "route_vs_raw_throughput": ratio(figures["route_msgs_per_s"],
                                             figures["raw_hop_msgs_per_s"]),
            "route_vs_raw_p50": ratio(figures["route_p50_us"], figures["raw_hop_p50_us"]),
            "route_vs_celery_throughput": ratio(figures["route_msgs_per_s"],
                                                figures["celery_task_msgs_per_s"]),
            "route_pipelined_vs_celery_throughput": ratio(figures["route_pipelined_msgs_per_s"],
                                                          figures["celery_task_msgs_per_s"]),
            "route_pipelined_vs_raw": ratio(figures["route_pipelined_msgs_per_s"],
                                            figures["raw_hop_msgs_per_s"]),
            "match_cost_ratio_10000_vs_10": ratio(figures["match_us_10000_subs"],
                                                  figures["match_us_10_subs"]),
            "route_secure_vs_raw_throughput": ratio(figures["route_secure_msgs_per_s"],
                                                    figures["raw_hop_msgs_per_s"]),
            "route_vs_raw_throughput_median_of_reps": m.get("route_vs_raw_throughput"),
            "route_pipelined_vs_raw_median_of_reps": m.get("route_pipelined_vs_raw"),
            "route_send_per_s": m.get("route_send_per_s"),
            "route_pipelined_send_per_s": m.get("route_pipelined_send_per_s"),
            "celery_send_per_s": m.get("celery_send_per_s"),
        })
        for size in self.plan.match_sizes:
            if size not in (10, 10_000):
                figures[f"match_us_{size}_subs"] = m.get(f"match_us_{size}_subs")
            figures[f"match_us_{size}_subs_mixed"] = m.get(f"match_us_{size}_subs_mixed")
        figures["match_cost_ratio_10000_vs_10_mixed"] = ratio(
            m.get("match_us_10000_subs_mixed"), m.get("match_us_10_subs_mixed"))
        figures.update({k: median(v) for k, v in self.runs.items() if k.startswith("cpu_us_per_msg_")})
        figures.update({k: v for k, v in self.extra.items() if k.startswith("match_mean_hits_")})
        figures.update({k: v for k, v in self.extra.items() if k.startswith("redis_")})
        p = self.plan
        meta = {"plan": p.name, "reps": p.reps, "latency_reps": p.latency_reps,
                "latency_rate_per_s": p.latency_rate, "fanout_subscribers": p.fanout_peers,
                "idle_peers": p.idle_peers, "finished": datetime.now(UTC).isoformat(),
                "cpus": os.cpu_count(), "loadavg_start": list(self.load_start),
                "loadavg_end": list(os.getloadavg()), "errors": self.errors}
        wall = time.monotonic() - self.started
        return {**figures, "wall_time_s": wall, "targets": targets_section(figures),
                "runs": self.runs, "meta": meta}


def with_cpu(svc: Services, scenario: str | None, count: int,
             call: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``call`` and add the CPU per message of Redis and the scenario's router to its result.

    The scenario's own processes report theirs (``publisher``, ``subscribers``); ``total`` sums
    every part, so raw and routed paths compare by what a message costs the whole machine.
    """
    before = svc.cpu_seconds(scenario)
    res = call()
    after = svc.cpu_seconds(scenario)
    cpu = res.setdefault("cpu_us_per_msg", {})
    for part, seconds in after.items():
        if part in before:
            cpu[part] = (seconds - before[part]) * 1e6 / count
    cpu["total"] = sum(v for k, v in cpu.items() if k != "total")
    return res


def _slug(label: str) -> str:
    return label.replace(" ", "-").replace("/", "of")


def _us(values: list[float] | None) -> str:
    return f"{values[-1]:,.0f}us" if values else "missing"
