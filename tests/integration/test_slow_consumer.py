"""A member whose inbox lags makes the sidecar emit cluster.member.slow, once per episode."""

from __future__ import annotations

import json

import redis

from coordinator.cluster.duties import Duties
from coordinator.cluster.membership import Membership
from coordinator.keys import PEER_GROUP, Keys
from coordinator.settings import Settings


def slow_events(client: redis.Redis, keys: Keys) -> list[dict[str, object]]:
    return [json.loads(f["d"]) for _, f in client.xrange(keys.system)
            if f.get("t") == "cluster.member.slow"]


def test_slow_is_announced_once_per_episode(client: redis.Redis, keys: Keys, settings: Settings) -> None:
    duties = Duties(client, settings.replace(slow_consumer_lag=20))
    Membership(client, keys).register("lagging")
    Membership(client, keys).register("keeping-up")
    for peer in ("lagging", "keeping-up"):
        client.xgroup_create(keys.responses(peer), PEER_GROUP, id="$", mkstream=True)
    for i in range(30):
        client.xadd(keys.responses("lagging"), {"k": "msg", "i": str(i)})
        client.xadd(keys.responses("keeping-up"), {"k": "msg", "i": str(i)})
    client.xreadgroup(PEER_GROUP, "c", {keys.responses("keeping-up"): ">"})  # read all 30

    assert duties.watch_inboxes() == ["lagging"]
    assert duties.watch_inboxes() == []  # the same episode: no second event
    assert [(e["peer_id"], e["lag"], e["limit"]) for e in slow_events(client, keys)] == \
        [("lagging", 30, 20)]

    client.xreadgroup(PEER_GROUP, "c", {keys.responses("lagging"): ">"}, count=25)  # lag 5 < 10
    assert duties.watch_inboxes() == []
    assert client.smembers(keys.slow) == set()  # the episode ended
    for i in range(30):
        client.xadd(keys.responses("lagging"), {"k": "msg", "i": f"b{i}"})
    assert duties.watch_inboxes() == ["lagging"]  # a new episode, a new event
    assert len(slow_events(client, keys)) == 2
