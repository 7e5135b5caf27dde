"""Message ids made by the publisher, headers passed through, trace context carried along."""

from __future__ import annotations

import asyncio

import pytest
import redis
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from coordinator.errors import InvalidHeaders
from coordinator.keys import Keys
from coordinator.settings import Settings
from coordinator.sidecar import ClusterSidecar
from mixin import Message
from tests.support import Peer, async_wait_for

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN_ID = 0x00F067AA0BA902B7


async def test_ids_are_the_publishers_and_headers_travel_untouched(
        settings: Settings, sidecar: ClusterSidecar) -> None:
    got: list[Message] = []
    async with Peer(settings=settings) as pub, Peer(settings=settings) as sub:
        await sub.cluster_subscribe("h.>", got.append)
        tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        one = await pub.cluster_publish("h.one", 1, headers={"traceparent": tp, "x-req": "7"})
        folded = await asyncio.gather(*(pub.cluster_publish("h.many", i, headers={"n": str(i)})
                                        for i in range(5)))
        plain = await pub.cluster_publish("h.plain", 2)
        await async_wait_for(lambda: len(got) == 7, what="seven messages")
    assert [m.id for m in got] == [one, *folded, plain]
    assert len(one) == 26 and sorted([one, *folded, plain]) == [one, *folded, plain]  # ULIDs
    assert got[0].headers == {"traceparent": tp, "x-req": "7"}
    assert [m.headers for m in got[1:6]] == [{"n": str(i)} for i in range(5)]
    assert got[6].headers == {} and got[6].site is None


@pytest.mark.parametrize("headers, reason", [
    ({"bad name": "x"}, "name"),
    ({"ok": 5}, "string"),
    ({"ok": "line\nbreak"}, "control"),
    ({"big": "x" * 5000}, "limit"),
    (["not", "a", "mapping"], "mapping"),
])
async def test_bad_headers_are_refused_at_the_call(settings: Settings, sidecar: ClusterSidecar,
                                                   headers: object, reason: str) -> None:
    async with Peer(settings=settings) as pub:
        with pytest.raises(InvalidHeaders, match=reason):
            await pub.cluster_publish("h.x", 1, headers=headers)  # type: ignore[arg-type]


async def test_the_router_refuses_bad_ids_and_headers_written_by_hand(
        settings: Settings, sidecar: ClusterSidecar, client: redis.Redis) -> None:
    keys = Keys(settings.namespace)
    got: list[Message] = []
    async with Peer(settings=settings) as pub, Peer(settings=settings) as sub:
        await sub.cluster_subscribe("raw.>", got.append)
        base = {"k": "pub", "s": pub.id, "d": "1"}
        bad_id = client.xadd(keys.requests(0), {**base, "t": "raw.a", "i": "no spaces allowed"})
        bad_json = client.xadd(keys.requests(0), {**base, "t": "raw.b", "h": "{nope"})
        bad_value = client.xadd(keys.requests(0), {**base, "t": "raw.c", "h": '{"a": 1}'})
        client.xadd(keys.requests(0), {**base, "t": "raw.ok", "i": "mine-1", "h": '{"a": "b"}'})
        await async_wait_for(lambda: got, what="the good publish")
        await async_wait_for(lambda: client.xlen(keys.deadletter) == 3, what="three dead letters")
    assert [(m.topic, m.id, m.headers) for m in got] == [("raw.ok", "mine-1", {"a": "b"})]
    dead = {f["entry"]: f["reason"] for _, f in client.xrange(keys.deadletter)}
    assert dead == {bad_id: "bad_request", bad_json: "invalid_headers", bad_value: "invalid_headers"}


async def test_trace_context_is_injected_and_the_handler_runs_inside_it(
        settings: Settings, sidecar: ClusterSidecar) -> None:
    seen: list[tuple[str, int, int]] = []

    def handler(m: Message) -> None:
        ctx = trace.get_current_span().get_span_context()
        seen.append((m.headers.get("traceparent", ""), ctx.trace_id, ctx.span_id))

    async with Peer(settings=settings) as pub, Peer(settings=settings) as sub:
        await sub.cluster_subscribe("t.>", handler)
        parent = NonRecordingSpan(SpanContext(TRACE_ID, SPAN_ID, is_remote=False,
                                              trace_flags=TraceFlags(TraceFlags.SAMPLED)))
        with trace.use_span(parent):
            await pub.cluster_publish("t.traced", 1)
        await pub.cluster_publish("t.untraced", 2)
        await async_wait_for(lambda: len(seen) == 2, what="both messages")
    assert seen[0] == (f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01", TRACE_ID, SPAN_ID)
    assert seen[1] == ("", 0, 0)  # no context: none invented, none leaked from the first
