"""The live terminal view of ``sidecar up`` (rich): sites, peers, leader and term, policy states,
subscriptions and message rates, redrawn each second. Used only when stdout is a terminal; the
supervisor prints one plain status line per site each second otherwise (as in CI)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

__all__ = ["LiveView"]


class LiveView:
    """Redraws what :meth:`show` is given; a context manager around rich's Live display."""

    def __init__(self, namespace: str, console: Console | None = None) -> None:
        self.namespace = namespace
        self.console = console or Console()
        self._live = Live(console=self.console, refresh_per_second=4, transient=False)
        self._last: dict[str, tuple[float, int, int]] = {}
        """Site -> (when, routed, delivered) of the previous report, for the rates."""

    def __enter__(self) -> LiveView:
        self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._live.stop()

    def show(self, reports: dict[str, dict[str, Any] | None], startup: list[str] | None = None) -> None:
        """Draw ``reports`` (site -> cluster report with members and policy states, or None) and,
        while anything is still starting, the ``startup`` steps (done or awaited)."""
        self._live.update(self.render(reports, startup))

    def render(self, reports: dict[str, dict[str, Any] | None], startup: list[str] | None = None
               ) -> Group:
        sites = Table(title=f"sidecar up · namespace {self.namespace}", expand=False)
        for column in ("site", "peers", "leader (term)", "subscriptions", "routed/s", "delivered/s",
                       "rejected", "policy v", "routers"):
            sites.add_column(column)
        peers = Table(title="peers", expand=False)
        for column in ("site", "id", "role", "leader", "last seen", "inbox drops", "policy"):
            peers.add_column(column)
        now = time.monotonic()
        for site, r in reports.items():
            if r is None:
                sites.add_row(site, "[red]unreachable[/red]", *[""] * 7)
                continue
            routed_rate = delivered_rate = 0.0
            previous = self._last.get(site)
            if previous is not None and now > previous[0]:
                routed_rate = (r["routed"] - previous[1]) / (now - previous[0])
                delivered_rate = (r["delivered"] - previous[2]) / (now - previous[0])
            self._last[site] = (now, r["routed"], r["delivered"])
            leader = f"{str(r['leader_id'])[-6:]} ({r['leader_term']})" if r["leader_id"] else "none"
            sites.add_row(site, str(r["cluster_size"]), leader, str(r["active_subscriptions"]),
                          f"{max(0.0, routed_rate):.0f}", f"{max(0.0, delivered_rate):.0f}",
                          str(r["rejected"]), str(r["policy_version"]), str(len(r["routers"])))
            for m in r["members"]:
                state = r["policy"].get(m["id"], "")
                colour = {"SYNCED": "green", "STALE": "yellow", "NACKED": "red"}.get(state, "white")
                peers.add_row(site, m["id"], m["role"], "★" if m["id"] == r["leader_id"] else "",
                              f"{m['last_seen_s']}s", str(m["inbox_drops"]),
                              f"[{colour}]{state}[/{colour}]")
        if startup and any(line.startswith("…") for line in startup):
            steps = Table(title="starting", expand=False, show_header=False)
            steps.add_column("step")
            for line in startup:
                colour = "green" if line.startswith("✓") else "yellow"
                steps.add_row(f"[{colour}]{line}[/{colour}]")
            return Group(steps, sites, peers)
        return Group(sites, peers)
