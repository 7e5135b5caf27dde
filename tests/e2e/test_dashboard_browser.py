"""The dashboard in a real browser (headless Debian chromium driven by Playwright) against a live
cluster of real processes: a worker, a beat, two election peers and a policy peer that refuses the
policy set. The peers appear, the chart moves while traffic flows, a NACKED peer shows as such, and
the leader mark moves after the leader is SIGKILLed. A screenshot is saved beside the test's logs."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from coordinator.keys import Keys
from coordinator.policy.store import PolicyStore
from coordinator.routing.rejections import deadletter_entry
from coordinator.settings import Settings
from ops.dashboard import make_server
from tests.e2e.election_peer import start_peer, start_sidecar, stop_all
from tests.support import Peer, Processes, serve_http, sidecar_env, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def dashboard(redis_url: str, namespace: str) -> Iterator[str]:
    server = make_server(Settings(redis_url=redis_url, namespace=namespace,
                                  dashboard_user="ops", dashboard_password="pa55word"))
    for base in serve_http(server):
        yield base + "/"


class Traffic:
    """A peer (not eligible to lead) publishing ten messages a second from a thread of its own."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async with Peer(settings=self.settings, leader_eligible=False, role="traffic") as peer:
            await peer.cluster_subscribe("chart.>", lambda m: None)
            n = 0
            while not self.stop.is_set():
                await peer.cluster_publish("chart.tick", n)
                n += 1
                await asyncio.sleep(0.1)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(15)


def test_the_dashboard_in_a_browser_follows_a_live_cluster(
        procs: Processes, redis_url: str, namespace: str, client: redis.Redis, dashboard: str) -> None:
    from playwright.sync_api import sync_playwright

    if CHROMIUM is None:
        if os.environ.get("SIDECAR_REQUIRE_BROWSER"):
            pytest.fail("no chromium: .ci/run installs it with `apt-get install chromium`")
        pytest.skip("needs Debian's chromium (`apt-get install chromium`; .ci/run installs it)")
    env = sidecar_env(redis_url, namespace)
    keys = Keys(namespace)
    try:
        start_sidecar(procs, env, client)
        first, second = start_peer(procs, env, client, "p1"), start_peer(procs, env, client, "p2")
        wait_for(lambda: client.hget(keys.leader, "id") in (first.id, second.id), 20,
                 what="a leader among the election peers")
        strict = procs.python(env, "policy-peer", "tests/e2e/policy_peers.py", "1",
                              f"test:{namespace}:report", "--strict", "1")
        nacker = wait_for(lambda: next((line.split()[1] for line in procs.log(strict).splitlines()
                                        if line.startswith("peer ")), None), 20, what="the policy peer")
        PolicyStore(client, keys).set("no-tempo", {"statements": [], "data": {"mood": "calm"}})
        with Traffic(Settings(redis_url=redis_url, namespace=namespace)), sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            context = browser.new_context(viewport={"width": 1100, "height": 1100},
                                          http_credentials={"username": "ops", "password": "pa55word"})
            page = context.new_page()
            page.goto(dashboard)
            row = "#peers tbody tr[data-peer='{}']"
            for peer in (first.id, second.id, nacker):
                page.wait_for_selector(row.format(peer), timeout=20_000)
            page.wait_for_selector(row.format(nacker) + " td.policy.NACKED", timeout=20_000)
            # the chart moves: a recent second with messages routed
            page.wait_for_function("JSON.parse(document.getElementById('chart').dataset.points)"
                                   ".some(p => p.routed > 0)", timeout=20_000)
            leader = page.get_attribute("#peers tbody tr:has(td.leader:has-text('leader'))",
                                        "data-peer", timeout=20_000)
            assert leader in (first.id, second.id)
            victim, heir = (first, second) if leader == first.id else (second, first)
            procs.kill(victim.proc)  # SIGKILL: no goodbye
            page.wait_for_selector(row.format(heir.id) + " td.leader:has-text('leader')",
                                   timeout=30_000)
            assert page.query_selector(row.format(victim.id) + " td.leader:has-text('leader')") is None
            # the term history names the heir, after the victim; the router shows its partition
            page.wait_for_selector(f"#leadership tbody tr:first-child:has(code:text-is('{heir.id}'))"
                                   f":has(code:text-is('{victim.id}'))", timeout=20_000)
            page.wait_for_selector("#workers tbody tr[data-worker] td:nth-child(2):text-is('0')",
                                   timeout=20_000)
            # subscriptions, and a dead letter replayed with its button
            page.wait_for_selector("#subscriptions td:has-text('chart.>')", timeout=20_000)
            letter = client.xadd(keys.deadletter, deadletter_entry(
                "handler_failed", "boom", stream="inbox", entry="01DEADLETTER00000000000000",
                peer=heir.id, topic="chart.tick", raw="1", sender=heir.id))
            page.wait_for_selector("#deadreasons b[data-reason='handler_failed']", timeout=20_000)
            page.click(f"button[data-replay='{letter}']", timeout=20_000)
            page.wait_for_selector(f"#replayed:has-text('replayed {letter}')", timeout=20_000)
            assert not client.xrange(keys.deadletter, letter, letter)
            shot = Path(procs.dir) / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            browser.close()
    finally:
        stop_all(procs)
