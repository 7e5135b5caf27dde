"""A peer's own status fields travel with its heartbeats to `sidecar peers` and the dashboard,
whatever they hold: a value JSON cannot carry must never stop the heartbeats."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import redis

from coordinator.keys import Keys
from coordinator.settings import Settings
from coordinator.sidecar import ClusterSidecar
from coordinator.status import StatusField
from mixin import Agent, SidecarMixin
from ops.report import members_report
from tests.support import async_wait_for


class Odd(Agent, SidecarMixin):
    """Status fields a real application has: a time, a rate that may be NaN."""

    started = StatusField(datetime(2026, 12, 7, 12, 0, tzinfo=UTC))
    rate = StatusField(float("nan"))


async def test_status_fields_json_cannot_carry_are_shown_and_the_heartbeats_go_on(
        settings: Settings, client: redis.Redis, keys: Keys) -> None:
    st = settings.replace(heartbeat_interval=0.1, member_ttl=1.0)
    sc = ClusterSidecar(settings=st)
    await sc.setup()
    try:
        async with Odd(namespace=st.namespace, settings=st) as peer:
            def status() -> dict[str, object]:
                return json.loads(client.hget(keys.member(peer.id), "status") or "{}")

            await async_wait_for(lambda: status().get("started"), what="the status with a heartbeat")
            assert status()["started"] == "2026-12-07 12:00:00+00:00" and status()["rate"] is None
            seen = client.hget(keys.member(peer.id), "seen")
            peer.rate = 2.5
            await async_wait_for(lambda: status()["rate"] == 2.5, what="the next heartbeat's status")
            assert client.hget(keys.member(peer.id), "seen") != seen  # the heartbeats go on
            row = next(m for m in members_report(client, keys) if m["id"] == peer.id)
            assert row["name"] == "Odd" and row["status"]["rate"] == 2.5
    finally:
        await sc.teardown()
