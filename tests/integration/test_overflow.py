"""What a full inbox does: drop_oldest trims and counts, reject refuses and dead-letters; both shown."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis
from click.testing import CliRunner

from coordinator.cluster.membership import Membership
from coordinator.keys import PEER_GROUP, REQUEST_GROUP, Keys
from coordinator.routing.router import Router
from coordinator.settings import Settings
from ops.cli import cli

SLOW = "01SLOWPEER000000000000000A"
FAST = "01PUBLISHER00000000000000A"


@pytest.fixture
def router(settings: Settings, client: redis.Redis) -> Iterator[Router]:
    r = Router(client, settings, name="r1")
    try:
        yield r
    finally:
        r.stop()


def setup_cluster(client: redis.Redis, keys: Keys, router: Router) -> None:
    """A publisher, and a slow peer subscribed to 'o.>' that never reads its inbox."""
    m = Membership(client, keys)
    m.register(FAST)
    m.register(SLOW)
    client.xgroup_create(keys.responses(SLOW), PEER_GROUP, id="0", mkstream=True)
    client.xadd(keys.requests(0), {"k": "sub", "s": SLOW, "t": "o.>", "r": "s1"})
    drain(router)
    client.xtrim(keys.responses(SLOW), maxlen=0)  # the subscribe reply: start from empty


def drain(r: Router) -> None:
    while r.step():
        pass
    r.flush()


def publish(client: redis.Redis, keys: Keys, n: int, start: int = 0) -> list[str]:
    return [str(client.xadd(keys.requests(0), {"k": "pub", "s": FAST, "t": "o.x", "d": str(i),
                                               "i": f"m{i}"})) for i in range(start, start + n)]


def run_cli(settings: Settings, *args: str) -> object:
    res = CliRunner().invoke(cli, ["--redis-url", str(settings.redis_url), "--namespace",
                                   settings.namespace, *args])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def test_reject_keeps_what_is_queued_and_dead_letters_the_rest(client: redis.Redis, keys: Keys,
                                                               settings: Settings) -> None:
    st = settings.replace(inbox_maxlen=10, inbox_overflow="reject")
    r = Router(client, st, name="r1")
    try:
        setup_cluster(client, keys, r)
        publish(client, keys, 25)
        drain(r)
    finally:
        r.stop()
    inbox = [f for _, f in client.xrange(keys.responses(SLOW))]
    assert [f["i"] for f in inbox] == [f"m{i}" for i in range(10)]  # the first ten, untouched
    dead = [f for _, f in client.xrange(keys.deadletter)]
    assert [(f["reason"], f["peer"], f["entry"]) for f in dead] == \
        [("inbox_full", SLOW, f"m{i}") for i in range(10, 25)]
    assert client.hget(keys.inbox_drops, SLOW) == "15"
    assert client.xpending(keys.requests(0), REQUEST_GROUP)["pending"] == 0  # all acknowledged
    peers = run_cli(st, "peers", "--json")
    assert {p["id"]: p["inbox_drops"] for p in peers} == {SLOW: 15, FAST: 0}  # type: ignore[union-attr]
    status = run_cli(st, "status", "--json")
    assert status["inbox_drops"] == 15  # type: ignore[index]


def test_drop_oldest_trims_and_counts_exactly(client: redis.Redis, keys: Keys,
                                             settings: Settings) -> None:
    st = settings.replace(inbox_maxlen=100)  # drop_oldest is the default
    r = Router(client, st, name="r1")
    try:
        setup_cluster(client, keys, r)
        for start in range(0, 600, 50):
            publish(client, keys, 50, start)
            drain(r)
    finally:
        r.stop()
    kept = [f["i"] for _, f in client.xrange(keys.responses(SLOW))]
    assert kept == [f"m{i}" for i in range(600 - len(kept), 600)]  # the newest, in order
    assert len(kept) < 600
    assert int(client.hget(keys.inbox_drops, SLOW) or 0) == 600 - len(kept)
    assert client.xlen(keys.deadletter) == 0
