"""How a peer's inbox entries reach its handlers (mixin.delivery), without Redis: repeats,
parking, the sidecar's own messages, expiry and the subscription count."""

from __future__ import annotations

import logging
from typing import Any

from coordinator.protocol import SYSTEM_SENDER
from coordinator.settings import Settings
from mixin.delivery import Delivery


class Link:
    """What a delivery uses of a peer's link: its id, Redis's clock, acks and writes."""

    peer_id = "me"
    max_payload_bytes = 1 << 20

    def __init__(self) -> None:
        self.now_ms = 1_000_000
        self.acked: list[str] = []
        self.written: list[dict[str, str]] = []

    def redis_now_ms(self) -> int:
        return self.now_ms

    async def ack(self, entry_ids: list[str]) -> None:
        self.acked += entry_ids

    async def write(self, fields: dict[str, str]) -> None:
        self.written.append(fields)


class Counts:
    messages_received = 0
    handler_errors = 0
    messages_expired = 0


class Peer:
    """A delivery with its link, counters and hooks recorded."""

    def __init__(self) -> None:
        self.link = Link()
        self.counts = Counts()
        self.events: list[str] = []
        self.subscriptions: list[int] = []
        self.delivery = Delivery(Settings(namespace="delivery"), link=lambda: self.link,
                                 counts=self.counts, on_system=self.on_system,
                                 on_subscriptions=self.subscriptions.append,
                                 log=logging.getLogger("test.delivery"))

    async def on_system(self, topic: str, data: Any) -> None:
        self.events.append(f"system {topic}")

    def handler(self, name: str) -> Any:
        return lambda m: self.events.append(f"{name} {m.topic} {m.data}")


def entry(topic: str, data: str = "1", *, sender: str = "p1", mid: str = "m1",
          **more: str) -> dict[str, str]:
    return {"k": "msg", "t": topic, "d": data, "s": sender, "i": mid, **more}


async def test_a_repeat_runs_no_handler_but_another_senders_message_with_that_id_does() -> None:
    p = Peer()
    await p.delivery.add(("a.>", ""), p.handler("h"))
    assert await p.delivery.on_entry("1-0", entry("a.b"))
    assert await p.delivery.on_entry("2-0", entry("a.b"))  # settled: a repeat is acknowledged
    assert await p.delivery.on_entry("3-0", entry("a.b", sender="p2"))
    assert p.events == ["h a.b 1", "h a.b 1"]
    assert p.counts.messages_received == 2


async def test_an_entry_before_its_handler_is_parked_then_handled_when_it_subscribes() -> None:
    p = Peer()
    p.delivery.park_for(60)
    assert not await p.delivery.on_entry("1-0", entry("late.x"))  # not settled: not acked
    assert p.delivery.parked == 1 and p.events == []
    await p.delivery.add(("late.*", ""), p.handler("h"))
    assert p.events == ["h late.x 1"] and p.delivery.parked == 0
    assert p.link.acked == ["1-0"]  # acknowledged once handled


async def test_the_sidecars_own_message_reaches_the_hook_before_the_handlers() -> None:
    p = Peer()
    await p.delivery.add(("cluster.leader", ""), p.handler("h"))
    assert await p.delivery.on_entry("1-0", entry("cluster.leader", '{"leader_id": "x"}',
                                                  sender=SYSTEM_SENDER))
    assert p.events == ["system cluster.leader", "h cluster.leader {'leader_id': 'x'}"]


async def test_an_expired_message_is_dead_lettered_and_handled_by_nobody() -> None:
    p = Peer()
    await p.delivery.add(("a.>", ""), p.handler("h"))
    assert await p.delivery.on_entry("1-0", entry("a.b", x=str(p.link.now_ms - 5)))
    assert p.events == [] and p.counts.messages_expired == 1
    (dead,) = p.link.written
    assert (dead["k"], dead["reason"], dead["i"], dead["o"]) == ("dl", "expired", "m1", "p1")


async def test_a_request_is_answered_by_the_handlers_return_value() -> None:
    p = Peer()
    await p.delivery.add(("ask", ""), lambda m: {"echo": m.data})
    assert await p.delivery.on_entry("1-0", entry("ask", "5", rt="p1"))
    (answer,) = p.link.written
    assert (answer["k"], answer["to"], answer["ri"], answer["ok"], answer["d"]) == \
        ("rep", "p1", "m1", "1", '{"echo":5}')


async def test_the_subscription_count_leaves_the_internal_ones_out() -> None:
    p = Peer()
    assert await p.delivery.add(("cluster.leader", ""), p.handler("h"))
    assert await p.delivery.add(("a.>", ""), p.handler("h"))
    assert not await p.delivery.add(("a.>", ""), p.handler("h2"))  # one more handler, same one
    assert await p.delivery.add(("a.>", "workers"), p.handler("h3"))
    p.delivery.forget(("a.>", ""))
    assert p.subscriptions == [0, 1, 1, 2, 1]
    assert ("a.>", "workers") in p.delivery and ("a.>", "") not in p.delivery
