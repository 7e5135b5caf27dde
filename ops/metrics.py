"""Prometheus metrics of a namespace, read from Redis at each scrape (``/metrics``).

Every figure here is what Redis holds, so any process that can read the namespace serves the
same numbers (the dashboard does): counters the routers, peers and bridges add to (routed,
delivered, rejected, dropped requests, messages a full inbox dropped), and gauges of the state
now (cluster size, leader term, policy version and peers per sync state, inbox length and lag
per peer, dead letters held by reason, sites reachable, peers held back by their rate), the
routers' batch-size and fan-out latency histograms, and the bridge's traffic per site.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from coordinator.histogram import BATCH_SIZE, FANOUT_SECONDS, cumulative
from coordinator.keys import Keys
from ops.report import cluster_report, members_report

__all__ = ["SidecarCollector", "registry"]

_DEAD_LETTER_SCAN = 10_000
"""Dead letters read per scrape at most (the newest), to count them by reason."""


class SidecarCollector(Collector):
    """Collects one namespace's metrics from ``client`` on each scrape."""

    def __init__(self, client: Any, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    def collect(self) -> Iterator[Metric]:
        report = cluster_report(self.client, self.keys)
        stats = self.client.hgetall(self.keys.stats)
        for name, field, doc in (
                ("sidecar_messages_routed", "routed", "Messages routed (publishes fanned out)."),
                ("sidecar_messages_delivered", "delivered", "Messages written into subscriber inboxes."),
                ("sidecar_requests_rejected", "rejected", "Requests the routers refused."),
                ("sidecar_requests_dropped", "dropped_requests",
                 "Requests dropped past a peer's request backlog (SIDECAR_PEER_BACKLOG).")):
            yield CounterMetricFamily(name, doc, value=int(stats.get(field, 0) or 0))
        yield GaugeMetricFamily("sidecar_cluster_size", "Live members of this site.",
                                value=report["cluster_size"])
        yield GaugeMetricFamily("sidecar_leader_term", "The leader's term (fencing token).",
                                value=report["leader_term"])
        yield GaugeMetricFamily("sidecar_policy_version", "Version of the policy set.",
                                value=report["policy_version"])
        members = members_report(self.client, self.keys)  # policy states and inboxes, one read
        states = Counter(row["policy_state"] for row in members)
        synced = GaugeMetricFamily("sidecar_peers_policy", "Live peers per policy sync state.",
                                   labels=["state"])
        for state in ("SYNCED", "STALE", "NACKED", "NONE"):  # NONE: no policy set yet
            synced.add_metric([state.lower()], states.get(state, 0))
        yield synced
        yield from self._inboxes(members)
        yield self._dead_letters()
        sites = GaugeMetricFamily("sidecar_site_reachable", "1 while a site is heard over NATS.",
                                  labels=["site"])
        for name, site in report["sites"].items():
            sites.add_metric([name], 1 if site["reachable"] else 0)
        yield sites
        throttled = GaugeMetricFamily("sidecar_peer_throttled_seconds",
                                      "Seconds until a peer over its rate is read again.",
                                      labels=["peer"])
        for peer, wait in report["throttled"].items():
            throttled.add_metric([peer], wait)
        yield throttled
        yield from self._histograms()
        yield self._bridge()

    def _histograms(self) -> Iterator[Metric]:
        fields = self.client.hgetall(self.keys.histograms)
        for name, doc in ((BATCH_SIZE, "Entries a router read in one go."),
                          (FANOUT_SECONDS, "From a publish reaching Redis to its fan-out into "
                                           "the subscribers' inboxes (per request entry), for "
                                           "publishes through the router; a direct publish is "
                                           "its own fan-out and is not counted.")):
            buckets, total = cumulative(fields, name)
            yield HistogramMetricFamily(f"sidecar_{name}", doc, buckets=buckets, sum_value=total)

    def _bridge(self) -> Metric:
        traffic = self.client.hgetall(self.keys.bridge_traffic)
        own = str(self.client.get(self.keys.site_name) or "")
        family = CounterMetricFamily("sidecar_bridge_messages", "Messages the site's NATS bridge "
                                     "sent (exported, site: this one) or delivered here "
                                     "(imported, site: where they came from; *: origins "
                                     "past the bridge's bound).",
                                     labels=["direction", "site"])
        for field, n in sorted(traffic.items()):
            direction, _, site = str(field).partition(" ")
            family.add_metric([direction, site or own], int(n))
        return family

    @staticmethod
    def _inboxes(members: list[dict[str, Any]]) -> Iterator[Metric]:
        length = GaugeMetricFamily("sidecar_inbox_length", "Entries held in a peer's inbox.",
                                   labels=["peer"])
        lag = GaugeMetricFamily("sidecar_inbox_lag", "Entries of a peer's inbox not read yet.",
                                labels=["peer"])
        dropped = CounterMetricFamily("sidecar_inbox_dropped", "Messages a peer's full inbox "
                                      "dropped or refused.", labels=["peer"])
        for m in members:
            length.add_metric([m["id"]], m["inbox_length"])
            if m["inbox_lag"] is not None:
                lag.add_metric([m["id"]], m["inbox_lag"])
            dropped.add_metric([m["id"]], m["inbox_drops"])
        yield from (length, lag, dropped)

    def _dead_letters(self) -> Metric:
        held = Counter(str(fields.get("reason", "unknown")) for _, fields in
                       self.client.xrevrange(self.keys.deadletter, count=_DEAD_LETTER_SCAN))
        family = GaugeMetricFamily("sidecar_dead_letters", "Dead letters held, by reason (of "
                                   f"the newest {_DEAD_LETTER_SCAN}).", labels=["reason"])
        for reason, count in sorted(held.items()):
            family.add_metric([reason], count)
        return family


def registry(client: Any, keys: Keys) -> CollectorRegistry:
    """A registry holding the namespace's collector alone."""
    out = CollectorRegistry(auto_describe=False)
    out.register(SidecarCollector(client, keys))
    return out
