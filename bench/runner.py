"""The schedule of one benchmark run, and the figures it derives.

1. ``SubscriptionIndex.match`` timings (in process, before any server runs).
2. Redis and one worker per scenario namespace; a warm-up round that is not recorded.
3. ``reps`` rounds. Each runs blocks of anchors and the figures measured against them: the three
   raw hops (``bench.raw``) with the route and secure runs, the pipelined raw hop with the pipelined
   route run, Celery at its default and at the project's configuration, then the fan-out. Within a
   block the order flips every round (anchors first, then measured first), so every figure
   alternates with its anchor while the machine's speed drifts. Every run but the fan-out also
   reports CPU per message of each process on its path (publisher, subscribers, router or Celery
   worker, Redis): on a CPU-bound machine that explains the ratios.
4. Paced latency rounds: the three raw hops and the route, at the same rate, order flipping.
5. Redis memory of idle peers.
6. Failover, beat takeover under churn, dual-leader checks (the Redis record and every peer's own
   ``is_leader``), policy convergence.
7. Federation (``bench.federation``): a NATS server and two sites; the raw NATS hop alternating with
   the cross-site route, paced latency of both, raw JetStream, a site catching up, and the failover
   of the namespace's leader across sites.

Anchors are the strongest plain designs: ``raw_hop_msgs_per_s`` is the fastest raw hop by median,
``raw_hop_p50_us`` the quickest by median p50, and every ratio naming the raw hop uses them (the
CPU figures ``cpu_us_per_msg_raw_*`` are the fastest hop's). A failed scenario repetition is recorded
under ``meta.errors`` and the run carries on; a figure with no successful repetition is reported as
missing (null) and fails its target.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from bench.celery_anchor import run_celery
from bench.federation import (
    Sites,
    run_catch_up,
    run_cross_site,
    run_cross_site_failover,
    run_raw_jetstream,
    run_raw_jetstream_paced,
    run_raw_nats,
)
from bench.ha import run_beat_ha, run_failover
from bench.match import measure_match
from bench.memory import run_idle_memory
from bench.plan import NOTES, Plan
from bench.policy_conv import run_policy_convergence
from bench.raw import VARIANTS, run_raw
from bench.report import median, percentile, ratio, targets_section
from bench.requests import run_queue_group, run_raw_rtt, run_request_reply
from bench.route import run_route
from bench.services import Services

__all__ = ["SCENARIOS", "Run"]

log = logging.getLogger("bench")
SCENARIOS = ["route", "routed", "secure", "pipelined", "fanout", "celery", "celery_default", "latency",
             "idle", "rpc", "group"]
"""One namespace and one worker each (``celery_default`` runs Celery's default configuration)."""

Step = tuple[str, Callable[[], dict[str, Any]]]
"""A named scenario repetition of a round."""


class Run:
    """One benchmark run under ``plan``; :meth:`execute` returns the results object."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.started = time.monotonic()
        self.runs: dict[str, list[float]] = {}
        self.rounds: list[dict[str, float]] = []
        """Throughput of each recorded round by run name, for ratios taken round by round."""
        self.errors: list[str] = []
        self.extra: dict[str, float] = {}
        self.beliefs: dict[str, list[dict[str, Any]]] = {"churn": [], "failover": []}
        """``belief`` summaries of the churn run and of the failover runs."""
        self.context: dict[str, Any] = {}
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
        mixed = measure_match(p.match_seconds, p.match_repeats, p.match_sizes)
        for size, timing in mixed.items():
            self.runs[f"match_us_{size}_subs"] = timing.runs
            self.extra[f"match_mean_hits_{size}_subs"] = timing.mean_matches
        same = measure_match(p.match_seconds, p.match_repeats, p.match_sizes, same_answer=True)
        for size, timing in same.items():
            self.runs[f"match_us_{size}_subs_same_answer"] = timing.runs
            self.extra[f"match_mean_hits_{size}_subs_same_answer"] = timing.mean_matches
        self.say("starting Redis and one worker per scenario namespace")
        with Services(SCENARIOS) as svc:
            self.say(f"Redis at {svc.url}; workers log to {svc.dir}")
            if p.warmup_fraction > 0:
                self.throughput_round(svc, "warm-up", p.warmup_fraction, record=False, flip=False)
            for rep in range(p.reps):
                self.throughput_round(svc, f"rep {rep + 1}/{p.reps}", 1.0, record=True,
                                      flip=rep % 2 == 1)
            for rep in range(p.latency_reps):
                self.latency_round(svc, f"latency {rep + 1}/{p.latency_reps}", flip=rep % 2 == 1)
            for rep in range(p.rpc_reps):
                self.rpc_round(svc, f"request/reply {rep + 1}/{p.rpc_reps}", flip=rep % 2 == 1)
            self.say(f"idle memory: {p.idle_peers} peers in {p.idle_procs} processes")
            idle = self.attempt("idle memory", lambda: run_idle_memory(
                svc.url, svc.namespace("idle"), p.idle_peers, p.idle_procs, p.settle_s,
                p.settle_max_s, p.scenario_timeout_s))
            if idle is not None:
                self.extra.update(idle)
            self.availability(svc)
        self.federation()
        return self.results()

    def federation(self) -> None:
        """Two sites joined by NATS: the cross-site figures and their NATS anchors."""
        p = self.plan
        t = p.scenario_timeout_s
        self.say("federation: a NATS server and two sites")
        with Sites() as sites:
            namespace = f"bench-xs-{uuid.uuid4().hex[:6]}"
            for site in ("a", "b"):
                sites.worker(site, namespace)
            sites.wait_federated(namespace, 60)
            for rep in range(p.federation_reps):
                steps: list[Step] = [
                    ("raw_nats", lambda: run_raw_nats(sites.nats_url, p.nats_msgs, timeout=t)),
                    ("cross_site", lambda: run_cross_site(sites, namespace, p.nats_msgs, timeout=t)),
                    ("raw_nats_paced", lambda: run_raw_nats(sites.nats_url, p.latency_msgs,
                                                            rate=p.latency_rate, timeout=t)),
                    ("cross_site_paced", lambda: run_cross_site(sites, namespace, p.latency_msgs,
                                                                rate=p.latency_rate, timeout=t)),
                    ("raw_jetstream_paced", lambda: run_raw_jetstream_paced(
                        sites.nats_url, p.latency_msgs, rate=p.latency_rate, timeout=t)),
                ]
                for name, call in reversed(steps) if rep % 2 else steps:
                    res = self.attempt(f"federation {rep + 1} {name}", call)
                    if res is None:
                        continue
                    if name.endswith("_paced"):
                        base = name.removesuffix("_paced")
                        self.record(f"{base}_p50_us", percentile(
                            [x / 1e3 for x in res["latency_ns"]], 50))
                    else:
                        self.record(f"{name}_msgs_per_s", res["msgs_per_s"])
                        for part, us in res.get("cpu_us_per_msg", {}).items():
                            self.record(f"cpu_us_per_msg_{name}_{part}", us)
            sites.stop_procs()
            for rep in range(p.federation_reps):
                js = self.attempt(f"federation {rep + 1} raw_jetstream", lambda: run_raw_jetstream(
                    sites.nats_url, p.jetstream_msgs, timeout=t))
                if js is not None:
                    self.record("raw_jetstream_msgs_per_s", js["msgs_per_s"])
                back = self.attempt(f"federation {rep + 1} catch_up", lambda: run_catch_up(
                    sites, p.catch_up_msgs, timeout=t * 2))
                if back is not None:
                    self.record("catch_up_msgs_per_s", back["msgs_per_s"])
                sites.stop_procs()
                failover = self.attempt(f"federation {rep + 1} failover",
                                        lambda: run_cross_site_failover(sites, timeout=t))
                if failover is not None:
                    self.record("cross_site_failover_s", failover["failover_s"])
                sites.stop_procs()
        self.say("federation: " + ", ".join(f"{k} {self.runs.get(k)}" for k in (
            "raw_nats_msgs_per_s", "cross_site_msgs_per_s", "raw_nats_p50_us", "cross_site_p50_us",
            "raw_jetstream_p50_us", "raw_jetstream_msgs_per_s", "catch_up_msgs_per_s",
            "cross_site_failover_s")))

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
                    self.beliefs["failover"].append(res["belief"])
        self.say(f"failover: {self.runs.get('failover_s')} tuned {self.runs.get('failover_tuned_s')}")
        beat = self.attempt("two beats", lambda: run_beat_ha(svc.url, tuned, p.beat_ha_s))
        if beat is not None:
            self.beliefs["churn"].append(beat.pop("belief"))
            for key, value in beat.items():
                self.record(key, value)
        self.say(f"beat: {beat}; beliefs: " + ", ".join(
            f"{k} {sum(b['overlap_ms'] for b in v):.1f}ms over {sum(b['intervals'] for b in v)} "
            "intervals" for k, v in self.beliefs.items()))
        conv = self.attempt("policy convergence", lambda: run_policy_convergence(
            svc.url, p.policy_peers, p.policy_procs, p.scenario_timeout_s * 2))
        if conv is not None:
            self.context["policy_heartbeat_interval_s"] = conv.pop("policy_heartbeat_interval_s")
            self.context["policy_member_ttl_s"] = conv.pop("policy_member_ttl_s")
            for key, value in conv.items():
                self.record(key, value)
        self.say(f"policy: {conv}")

    def _steps(self, svc: Services, label: str, scale: float) -> list[tuple[list[Step], list[Step]]]:
        """The round's blocks: (anchors, what is measured against them)."""
        p = self.plan
        t = p.scenario_timeout_s

        def n(count: int) -> int:
            return max(10, int(count * scale))

        def raw(variant: str) -> Step:
            key = f"bench:{svc.tag}:raw-{variant}:{_slug(label)}"
            return f"raw_{variant}", lambda: with_cpu(svc, None, n(p.raw_msgs), lambda: run_raw(
                svc.url, key, n(p.raw_msgs), variant=variant, timeout=t))

        piped = n(p.pipelined_msgs)
        chunk = min(p.pipeline_chunk, piped)
        raw_piped_key = f"bench:{svc.tag}:raw-pipelined:{_slug(label)}"
        tasks = n(p.celery_tasks)
        return [
            ([raw(v) for v in VARIANTS], [
                ("route", lambda: with_cpu(svc, "route", n(p.route_msgs), lambda: run_route(
                    svc.url, svc.namespace("route"), n(p.route_msgs), timeout=t))),
                ("route_via_router", lambda: with_cpu(svc, "routed", n(p.route_msgs), lambda: run_route(
                    svc.url, svc.namespace("routed"), n(p.route_msgs), timeout=t))),
                ("route_secure", lambda: with_cpu(svc, "secure", n(p.route_msgs), lambda: run_route(
                    svc.url, svc.namespace("secure"), n(p.route_msgs), timeout=t, secure=True))),
            ]),
            ([("raw_pipelined", lambda: with_cpu(svc, None, piped, lambda: run_raw(
                svc.url, raw_piped_key, piped, variant="lean", chunk=chunk, timeout=t)))],
             [("route_pipelined", lambda: with_cpu(svc, "pipelined", piped, lambda: run_route(
                 svc.url, svc.namespace("pipelined"), piped, mode="pipelined", chunk=chunk,
                 timeout=t)))]),
            ([("celery", lambda: with_cpu(svc, "celery_default", tasks + 1, lambda: run_celery(
                svc.url, svc.namespace("celery_default"), tasks, config="default", timeout=t),
                part="worker")),
              ("celery_project_config", lambda: with_cpu(svc, "celery", tasks + 1, lambda: run_celery(
                  svc.url, svc.namespace("celery"), tasks, config="project", timeout=t),
                  part="worker"))], []),
            ([], [("fanout", lambda: run_route(
                svc.url, svc.namespace("fanout"), n(p.fanout_msgs), procs=p.fanout_procs,
                peers_per_proc=p.fanout_peers_per_proc, timeout=t))]),
        ]

    def throughput_round(self, svc: Services, label: str, scale: float, *, record: bool,
                         flip: bool) -> None:
        """Every throughput block once; ``flip`` runs each block's measured runs first."""
        got: dict[str, dict[str, Any]] = {}
        for anchors, measured in self._steps(svc, label, scale):
            order = anchors + measured
            for name, call in reversed(order) if flip else order:
                res = self.attempt(f"{label} {name}", call)
                if res is not None:
                    got[name] = res
        self.say(f"{label}: " + ", ".join(
            f"{k} {v['deliveries_per_s' if k == 'fanout' else 'msgs_per_s']:,.0f}/s"
            for k, v in got.items()))
        if not record:
            return
        rates = {k: float(v["deliveries_per_s" if k == "fanout" else "msgs_per_s"])
                 for k, v in got.items()}
        self.rounds.append(rates)
        for name, res in got.items():
            for part, us in res.get("cpu_us_per_msg", {}).items():
                self.record(f"cpu_us_per_msg_{name}_{part}", us)
        figure = {f"raw_{v}": f"raw_hop_{v}" for v in VARIANTS}
        figure.update(celery="celery_task", celery_project_config="celery_task_project_config",
                      fanout="fanout100_deliveries")
        for name, rate in rates.items():
            self.record(f"{figure.get(name, name)}_per_s" if name == "fanout"
                        else f"{figure.get(name, name)}_msgs_per_s", rate)
            if "send_per_s" in got[name]:
                self.record(f"{figure.get(name, name)}_send_per_s", got[name]["send_per_s"])

    def latency_round(self, svc: Services, label: str, *, flip: bool) -> None:
        """The raw hops' and the route's one-way latency, all paced at ``latency_rate``."""
        p = self.plan
        steps: list[Step] = [(f"raw_hop_{v}", functools.partial(
            run_raw, svc.url, f"bench:{svc.tag}:lat-{v}:{_slug(label)}", p.latency_msgs, variant=v,
            rate=p.latency_rate, timeout=p.scenario_timeout_s)) for v in VARIANTS]
        steps.append(("route", lambda: run_route(
            svc.url, svc.namespace("latency"), p.latency_msgs, mode="paced",
            rate=p.latency_rate, timeout=p.scenario_timeout_s)))
        for name, call in reversed(steps) if flip else steps:
            res = self.attempt(f"{label} {name}", call)
            if res is None:
                continue
            lat_us = [x / 1e3 for x in res["latency_ns"]]
            for q in (50, 99):
                self.record(f"{name}_p{q}_us", percentile(lat_us, q))
        self.say(f"{label}: p50 " + ", ".join(
            f"{name} {_us(self.runs.get(f'{name}_p50_us'))}" for name, _ in steps))

    def rpc_round(self, svc: Services, label: str, *, flip: bool) -> None:
        """The raw round trip, request/reply through the sidecar, and a queue group, in turn."""
        p = self.plan
        t = p.scenario_timeout_s
        key = f"bench:{svc.tag}:rtt:{_slug(label)}"
        steps: list[Step] = [
            ("raw_rtt", lambda: run_raw_rtt(svc.url, key, p.rpc_msgs, t)),
            ("request_reply", lambda: run_request_reply(svc.url, svc.namespace("rpc"), p.rpc_msgs, t)),
            ("queue_group", lambda: run_queue_group(svc.url, svc.namespace("group"), p.rpc_msgs,
                                                    p.queue_members, t)),
        ]
        got = {}
        for name, call in reversed(steps) if flip else steps:
            res = self.attempt(f"{label} {name}", call)
            if res is None:
                continue
            got[name] = res
            if "latency_ns" in res:
                self.record(f"{name}_p50_us", percentile([x / 1e3 for x in res["latency_ns"]], 50))
                self.record(f"{name}_per_s", res["per_s"])
            else:
                self.record(f"{name}_msgs_per_s", res["msgs_per_s"])
        self.say(f"{label}: " + ", ".join(
            f"{k} {_us(self.runs.get(f'{k}_p50_us'))} {v['per_s']:,.0f}/s" if "per_s" in v
            else f"{k} {v['msgs_per_s']:,.0f}/s spread {v['spread']}" for k, v in got.items()))

    # ------------------------------------------------------------------ figures
    def results(self) -> dict[str, Any]:
        """The results object: named numbers, then ``targets``, ``notes``, ``runs`` and ``meta``."""
        m = {k: median(v) for k, v in self.runs.items()}
        p = self.plan
        throughput = {v: m.get(f"raw_hop_{v}_msgs_per_s") for v in VARIANTS}
        fastest = _best(throughput, max)
        p50 = {v: m.get(f"raw_hop_{v}_p50_us") for v in VARIANTS}
        quickest = _best(p50, min)
        f: dict[str, float | None] = {}
        # anchors
        f["raw_hop_msgs_per_s"] = throughput.get(fastest) if fastest else None
        for v in VARIANTS:
            f[f"raw_hop_{v}_msgs_per_s"] = throughput[v]
        f["raw_hop_send_per_s"] = m.get(f"raw_hop_{fastest}_send_per_s") if fastest else None
        f["raw_pipelined_msgs_per_s"] = m.get("raw_pipelined_msgs_per_s")
        f["raw_hop_p50_us"] = p50.get(quickest) if quickest else None
        f["raw_hop_p99_us"] = m.get(f"raw_hop_{quickest}_p99_us") if quickest else None
        for v in VARIANTS:
            f[f"raw_hop_{v}_p50_us"] = p50[v]
            f[f"raw_hop_{v}_p99_us"] = m.get(f"raw_hop_{v}_p99_us")
        f["celery_task_msgs_per_s"] = m.get("celery_task_msgs_per_s")
        f["celery_task_project_config_msgs_per_s"] = m.get("celery_task_project_config_msgs_per_s")
        # measured
        for name in ("route_msgs_per_s", "route_p50_us", "route_p99_us", "route_secure_msgs_per_s",
                     "route_via_router_msgs_per_s",
                     "route_pipelined_msgs_per_s", "fanout100_deliveries_per_s"):
            f[name] = m.get(name)
        # ratios with targets, against the strongest anchors
        f["route_vs_raw_throughput"] = ratio(f["route_msgs_per_s"], f["raw_hop_msgs_per_s"])
        f["route_via_router_vs_raw_throughput"] = ratio(f["route_via_router_msgs_per_s"],
                                                        f["raw_hop_msgs_per_s"])
        f["route_secure_vs_raw_throughput"] = ratio(f["route_secure_msgs_per_s"],
                                                    f["raw_hop_msgs_per_s"])
        f["route_vs_raw_p50"] = ratio(f["route_p50_us"], f["raw_hop_p50_us"])
        f["route_vs_celery_throughput"] = ratio(f["route_msgs_per_s"], f["celery_task_msgs_per_s"])
        f["route_pipelined_vs_raw_pipelined"] = ratio(f["route_pipelined_msgs_per_s"],
                                                      f["raw_pipelined_msgs_per_s"])
        f["route_vs_raw_throughput_median_of_reps"] = self._round_ratio("route", f"raw_{fastest}")
        f["route_pipelined_vs_raw_pipelined_median_of_reps"] = self._round_ratio(
            "route_pipelined", "raw_pipelined")
        f["route_pipelined_vs_celery_throughput"] = ratio(f["route_pipelined_msgs_per_s"],
                                                          f["celery_task_msgs_per_s"])
        # legacy ratios, against the anchors the benchmark used to carry
        f["route_pipelined_vs_raw"] = ratio(f["route_pipelined_msgs_per_s"], f["raw_hop_msgs_per_s"])
        f["route_vs_raw_async_throughput"] = ratio(f["route_msgs_per_s"],
                                                   f["raw_hop_async_msgs_per_s"])
        f["route_vs_raw_async_p50"] = ratio(f["route_p50_us"], f["raw_hop_async_p50_us"])
        f["route_vs_celery_project_config_throughput"] = ratio(
            f["route_msgs_per_s"], f["celery_task_project_config_msgs_per_s"])
        for name in ("route_send_per_s", "route_pipelined_send_per_s", "raw_pipelined_send_per_s",
                     "celery_task_send_per_s", "celery_task_project_config_send_per_s"):
            f[name] = m.get(name)
        # request/reply against the raw round trip; a queue group against plain routing
        for name in ("request_reply_p50_us", "request_reply_per_s", "raw_rtt_p50_us", "raw_rtt_per_s",
                     "queue_group_msgs_per_s"):
            f[name] = m.get(name)
        f["request_reply_p50_vs_raw_rtt"] = ratio(f["request_reply_p50_us"], f["raw_rtt_p50_us"])
        f["queue_group_vs_route_throughput"] = ratio(f["queue_group_msgs_per_s"], f["route_msgs_per_s"])
        # federation: across sites against the route and the plain NATS and JetStream clients
        for name in ("raw_nats_msgs_per_s", "raw_nats_p50_us", "raw_jetstream_msgs_per_s",
                     "raw_jetstream_p50_us", "cross_site_msgs_per_s", "cross_site_p50_us",
                     "catch_up_msgs_per_s", "cross_site_failover_s"):
            f[name] = m.get(name)
        f["cross_site_vs_route_throughput"] = ratio(f["cross_site_msgs_per_s"], f["route_msgs_per_s"])
        budget = (2 * f["route_p50_us"] + f["raw_nats_p50_us"]
                  if f["route_p50_us"] is not None and f["raw_nats_p50_us"] is not None else None)
        f["cross_site_p50_budget_us"] = budget
        f["cross_site_p50_vs_budget"] = ratio(f["cross_site_p50_us"], budget)
        stored = (2 * f["route_p50_us"] + f["raw_jetstream_p50_us"]
                  if f["route_p50_us"] is not None and f["raw_jetstream_p50_us"] is not None else None)
        f["cross_site_p50_vs_stored_budget"] = ratio(f["cross_site_p50_us"], stored)
        f["catch_up_vs_raw_jetstream"] = ratio(f["catch_up_msgs_per_s"], f["raw_jetstream_msgs_per_s"])
        # matching: the mixed workload carries the target
        for size in p.match_sizes:
            f[f"match_us_{size}_subs"] = m.get(f"match_us_{size}_subs")
        f["match_cost_ratio_10000_vs_10"] = ratio(m.get("match_us_10000_subs"),
                                                  m.get("match_us_10_subs"))
        for size in p.match_sizes:
            f[f"match_us_{size}_subs_same_answer"] = m.get(f"match_us_{size}_subs_same_answer")
        f["match_cost_ratio_10000_vs_10_same_answer"] = ratio(
            m.get("match_us_10000_subs_same_answer"), m.get("match_us_10_subs_same_answer"))
        f.update({k: v for k, v in self.extra.items() if k.startswith("match_mean_hits_")})
        # memory: used_memory growth is the figure, key sizes the legacy one
        f["redis_used_memory_per_idle_peer"] = self.extra.get("redis_used_memory_per_idle_peer")
        f["redis_bytes_per_idle_peer"] = self.extra.get("redis_bytes_per_idle_peer")
        f.update({k: v for k, v in self.extra.items() if k.startswith("redis_")})
        # availability
        for name in ("failover_s", "failover_tuned_s", "detection_s", "detection_tuned_s",
                     "beat_takeover_s", "dual_leader_samples", "leader_samples"):
            f[name] = m.get(name)
        f.update(self._belief_figures())
        policy = f"policy_convergence_{p.policy_peers}_peers_s"
        f[policy] = m.get(policy)
        f[f"policy_setup_{p.policy_peers}_peers_s"] = m.get(f"policy_setup_{p.policy_peers}_peers_s")
        # CPU per message of each process; cpu_us_per_msg_raw_* is the fastest raw hop's
        cpu = {k: median(v) for k, v in self.runs.items() if k.startswith("cpu_us_per_msg_")}
        if fastest:
            prefix = f"cpu_us_per_msg_raw_{fastest}_"
            f.update({"cpu_us_per_msg_raw_" + k[len(prefix):]: v for k, v in cpu.items()
                      if k.startswith(prefix)})
        f.update(cpu)
        notes = dict(NOTES)
        if fastest:
            notes["raw_hop_msgs_per_s"] = f"fastest raw hop: {fastest}"
            notes["cpu_us_per_msg_raw_total"] = f"the {fastest} raw hop's"
        if quickest:
            notes["raw_hop_p50_us"] = f"quickest raw hop, paced like the route run: {quickest}"
        overlaps = [o for runs in self.beliefs.values() for b in runs for o in b["overlaps"]]
        meta = {"plan": p.name, "reps": p.reps, "latency_reps": p.latency_reps,
                "latency_rate_per_s": p.latency_rate, "fanout_subscribers": p.fanout_peers,
                "idle_peers": p.idle_peers, "raw_hop_fastest": fastest,
                "raw_hop_quickest": quickest, "pipeline_chunk": p.pipeline_chunk,
                "dual_leader_overlaps": overlaps, **self.context,
                "finished": datetime.now(UTC).isoformat(),
                "cpus": os.cpu_count(), "loadavg_start": list(self.load_start),
                "loadavg_end": list(os.getloadavg()), "errors": self.errors}
        wall = time.monotonic() - self.started
        return {**f, "wall_time_s": wall, "targets": targets_section(f),
                "notes": {k: v for k, v in notes.items() if k in f}, "runs": self.runs,
                "meta": meta}

    def _round_ratio(self, top: str, bottom: str) -> float | None:
        """Median over the rounds of ``top / bottom`` measured in the same round."""
        return median(r[top] / r[bottom] for r in self.rounds if r.get(top) and r.get(bottom))

    def _belief_figures(self) -> dict[str, float | None]:
        """Time two peers believed they led at once, in the churn run and the failover runs."""
        churn, failover = self.beliefs["churn"], self.beliefs["failover"]
        complete = bool(churn) and bool(failover)

        def total(runs: list[dict[str, Any]], key: str) -> float | None:
            return float(sum(b[key] for b in runs)) if runs else None

        every = churn + failover
        return {
            "dual_leader_belief_ms": total(every, "overlap_ms") if complete else None,
            "dual_leader_belief_outside_ttl_ms": total(every, "outside_ttl_ms") if complete else None,
            "dual_leader_belief_churn_ms": total(churn, "overlap_ms"),
            "dual_leader_belief_failover_ms": total(failover, "overlap_ms"),
            "dual_leader_belief_overlaps": float(sum(len(b["overlaps"]) for b in every)),
            "leader_belief_intervals": float(sum(b["intervals"] for b in every)),
        }


def _best(values: dict[str, float | None], pick: Callable[..., Any]) -> str | None:
    """The key whose value ``pick`` (max or min) chooses among those measured."""
    measured = {k: v for k, v in values.items() if v is not None}
    return str(pick(measured, key=measured.__getitem__)) if measured else None


def with_cpu(svc: Services, scenario: str | None, count: int,
             call: Callable[[], dict[str, Any]], *, part: str = "router") -> dict[str, Any]:
    """Run ``call`` and add the CPU per message of Redis and the scenario's worker to its result.

    The scenario's own processes report theirs (``publisher``, ``subscribers``); the worker's is
    named ``part``; ``total`` sums every part, so the paths compare by what a message costs the
    whole machine.
    """
    before = svc.cpu_seconds(scenario, part)
    res = call()
    after = svc.cpu_seconds(scenario, part)
    cpu = res.setdefault("cpu_us_per_msg", {})
    for name, seconds in after.items():
        if name in before:
            cpu[name] = (seconds - before[name]) * 1e6 / count
    cpu["total"] = sum(v for k, v in cpu.items() if k != "total")
    return res


def _slug(label: str) -> str:
    return label.replace(" ", "-").replace("/", "of")


def _us(values: list[float] | None) -> str:
    return f"{values[-1]:,.0f}us" if values else "missing"
