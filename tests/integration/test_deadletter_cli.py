"""``sidecar deadletter list`` and ``replay``: an operator sees what was given up and sends it again."""

from __future__ import annotations

import json
from typing import Any

import redis
from click.testing import CliRunner

from coordinator import ClusterSidecar, Keys, Settings
from mixin import Message
from ops.cli import cli
from tests.support import Peer, async_wait_for


def sidecar_cli(settings: Settings, *args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, ["--redis-url", str(settings.redis_url), "--namespace",
                                   settings.namespace, "deadletter", *args])
    return res.exit_code, res.output


async def test_list_then_replay_a_failed_delivery_and_a_refused_request(
        settings: Settings, client: redis.Redis, keys: Keys) -> None:
    st = settings.replace(handler_backoff=0.01, handler_max_deliveries=2)
    sidecar = ClusterSidecar(settings=st, run_duties=False)
    await sidecar.setup()
    broken = True
    got: list[Message] = []

    def handler(m: Message) -> None:
        if broken:
            raise RuntimeError("database down")
        got.append(m)

    try:
        async with Peer(settings=st) as pub, Peer(settings=st) as sub:
            await sub.cluster_subscribe("jobs.>", handler)
            mid = await pub.cluster_publish("jobs.one", {"n": 1}, headers={"x-try": "1"})
            client.xadd(keys.requests(0), {"k": "pub", "s": pub.id, "t": "jobs.*", "d": "2"})
            await async_wait_for(lambda: client.xlen(keys.deadletter) == 2, what="two dead letters")

            code, out = sidecar_cli(st, "list", "--json")
            assert code == 0, out
            rows: list[dict[str, Any]] = json.loads(out)
            assert sorted(r["reason"] for r in rows) == ["handler_failed", "invalid_topic"]
            failed = next(r for r in rows if r["reason"] == "handler_failed")
            assert (failed["peer"], failed["entry"], failed["pattern"]) == (sub.id, mid, "jobs.>")
            refused = next(r for r in rows if r["reason"] == "invalid_topic")
            code, text = sidecar_cli(st, "list", "--reason", "handler_failed")
            assert code == 0 and failed["id"] in text and refused["id"] not in text

            broken = False
            code, out = sidecar_cli(st, "replay", failed["id"], refused["id"], "--json")
            assert code == 0, out
            assert [r["ok"] for r in json.loads(out)] == [True, True]
            await async_wait_for(lambda: got, what="the replayed delivery handled")
            assert (got[0].id, got[0].data, got[0].headers, got[0].sender) == \
                (mid, {"n": 1}, {"x-try": "1"}, pub.id)
            # the replayed request is checked again, and refused again, as a new dead letter
            await async_wait_for(lambda: client.xlen(keys.deadletter) == 1, what="the request refused")
            (_, again), = client.xrange(keys.deadletter)
            assert again["reason"] == "invalid_topic"

            code, out = sidecar_cli(st, "replay", "0-1")
            assert code == 1 and out.strip() == \
                "0-1: no dead letter 0-1 (list them with `sidecar deadletter list`)"
    finally:
        await sidecar.teardown()


async def test_a_replayed_queue_delivery_reaches_the_queue_subscription_only(
        settings: Settings, client: redis.Redis, keys: Keys) -> None:
    st = settings.replace(handler_backoff=0.01, handler_max_deliveries=2)
    sidecar = ClusterSidecar(settings=st, run_duties=False)
    await sidecar.setup()
    broken = True
    queued: list[Any] = []
    plain: list[Any] = []

    def in_group(m: Message) -> None:
        if broken:
            raise RuntimeError("worker down")
        queued.append((m.data, m.queue))

    try:
        async with Peer(settings=st) as pub, Peer(settings=st) as sub:
            await sub.cluster_subscribe("work.>", in_group, queue="w")
            await sub.cluster_subscribe("work.>", lambda m: plain.append(m.data))
            await pub.cluster_publish("work.a", 7)
            await async_wait_for(lambda: client.xlen(keys.deadletter) == 1, what="the dead letter")
            (dead_id, dead), = client.xrange(keys.deadletter)
            assert (dead["reason"], dead["queue"], dead["pattern"]) == ("handler_failed", "w", "work.>")
            assert plain == [7]  # the plain subscription handled it the first time
            broken = False
            code, out = sidecar_cli(st, "replay", dead_id)
            assert code == 0, out
            await async_wait_for(lambda: queued, what="the replayed queue delivery")
        assert queued == [(7, "w")] and plain == [7]  # the plain handler did not run again
    finally:
        await sidecar.teardown()
