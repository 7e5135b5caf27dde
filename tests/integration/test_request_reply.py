"""Request/reply: answers, no responders, timeouts, remote errors, and a requester that dies."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis

from coordinator.keys import Keys
from coordinator.settings import Settings
from coordinator.sidecar import ClusterSidecar
from mixin import Message, NoResponders, RemoteError, RequestTimeout
from tests.support import Peer, async_wait_for


async def test_a_handler_answers_by_returning_or_responding(settings: Settings,
                                                            sidecar: ClusterSidecar) -> None:
    async def double(m: Message) -> Any:
        return {"twice": m.data["n"] * 2, "by": "return", "request": m.is_request}

    async def echo(m: Message) -> None:
        await m.respond({"echo": m.data, "headers": m.headers})

    async with Peer(settings=settings) as asker, Peer(settings=settings) as answerer:
        await answerer.cluster_subscribe("math.double", double)
        await answerer.cluster_subscribe("echo.>", echo)
        await answerer.cluster_subscribe("sync.len", lambda m: len(m.data))
        assert await asker.cluster_request("math.double", {"n": 21}, timeout=5) == \
            {"twice": 42, "by": "return", "request": True}
        assert await asker.cluster_request("echo.x", [1, 2], timeout=5, headers={"a": "b"}) == \
            {"echo": [1, 2], "headers": {"a": "b"}}
        assert await asker.cluster_request("sync.len", "abcd", timeout=5) == 4
        # many in flight at once, each answered with its own data
        answers = await asyncio.gather(*(asker.cluster_request("math.double", {"n": i}, timeout=5)
                                         for i in range(50)))
        assert [a["twice"] for a in answers] == [2 * i for i in range(50)]


async def test_a_handler_may_ask_and_subscribe_while_later_messages_wait_their_turn(
        settings: Settings, sidecar: ClusterSidecar) -> None:
    # the answer and the sidecar's reply come through the inbox the handler is being run from
    priced: list[Any] = []
    handled: list[str] = []
    async with Peer(settings=settings) as shop, Peer(settings=settings) as prices, \
            Peer(settings=settings) as customer:
        await prices.cluster_subscribe("price", lambda m: {"sku": m.data, "cents": 250})

        async def on_order(m: Message) -> None:
            handled.append(f"order {m.data} asks")
            quote = await shop.cluster_request("price", m.data, timeout=5)
            await shop.cluster_subscribe(f"order.{m.data}.>", lambda m: handled.append(m.topic))
            handled.append(f"order {m.data} priced")
            await shop.cluster_publish("order.priced", quote)

        await shop.cluster_subscribe("order.new", on_order)
        await customer.cluster_subscribe("order.priced", lambda m: priced.append(m.data))
        await customer.cluster_publish("order.new", 7)
        await customer.cluster_publish("order.new", 8)
        await async_wait_for(lambda: len(priced) == 2, what="both priced orders")
        await customer.cluster_publish("order.7.paid", True)
        await async_wait_for(lambda: "order.7.paid" in handled, what="the handler's subscription")
    assert priced == [{"sku": 7, "cents": 250}, {"sku": 8, "cents": 250}]
    assert handled[:4] == ["order 7 asks", "order 7 priced", "order 8 asks", "order 8 priced"]


async def test_no_responders_timeouts_and_remote_errors(settings: Settings,
                                                        sidecar: ClusterSidecar) -> None:
    def boom(m: Message) -> None:
        raise ValueError(f"cannot handle {m.data}")

    async with Peer(settings=settings) as asker, Peer(settings=settings) as answerer:
        await answerer.cluster_subscribe("fail.>", boom)
        await answerer.cluster_subscribe("quiet.>", lambda m: None)  # takes it, never answers
        with pytest.raises(NoResponders, match=r"nobody.*'nobody\.home'"):  # not a timeout: at once
            await asker.cluster_request("nobody.home", 1, timeout=30)
        with pytest.raises(RemoteError, match="ValueError: cannot handle 7"):
            await asker.cluster_request("fail.x", 7, timeout=5)
        with pytest.raises(RequestTimeout, match=r"'quiet\.x' within 0\.3s"):
            await asker.cluster_request("quiet.x", 1, timeout=0.3)
        with pytest.raises(ValueError):
            await asker.cluster_request("quiet.x", 1, timeout=0)
        # the link forgot every request it no longer waits for
        assert not asker._require_link()._answers


async def test_a_requester_that_dies_leaves_the_responder_unharmed(
        settings: Settings, sidecar: ClusterSidecar, client: redis.Redis) -> None:
    keys = Keys(settings.namespace)
    started = asyncio.Event()
    release = asyncio.Event()

    async def slow(m: Message) -> str:
        started.set()
        await release.wait()
        return "late"

    async with Peer(settings=settings) as answerer:
        await answerer.cluster_subscribe("slow.x", slow)
        await answerer.cluster_subscribe("fast.x", lambda m: "quick")
        asker = Peer(settings=settings)
        await asker.setup()
        pending = asyncio.ensure_future(asker.cluster_request("slow.x", 1, timeout=30))
        await asyncio.wait_for(started.wait(), 10)
        pending.cancel()
        await asker.teardown()  # gone before the answer
        release.set()
        await async_wait_for(lambda: answerer.status_snapshot(include_hidden=True)["handler_errors"] == 0
                             and client.xlen(keys.deadletter) == 0, what="the late answer to be sent")
        async with Peer(settings=settings) as other:  # the responder still answers others
            assert await other.cluster_request("fast.x", None, timeout=5) == "quick"


async def test_a_reply_to_someone_else_is_refused(settings: Settings, sidecar: ClusterSidecar,
                                                  client: redis.Redis) -> None:
    keys = Keys(settings.namespace)
    async with Peer(settings=settings) as a, Peer(settings=settings) as b:
        eid = client.xadd(keys.requests(0), {"k": "pub", "s": a.id, "t": "x.y", "d": "1", "i": "r1",
                                             "rt": b.id})
        await async_wait_for(lambda: client.xlen(keys.deadletter) == 1, what="the refusal")
        (_, dead), = client.xrange(keys.deadletter)
        assert (dead["entry"], dead["reason"]) == (eid, "bad_request")
        assert "reply-to must be its sender" in dead["message"]


STALLS = 20
"""Lingers a conversation may still meet on a loaded machine: a reader that stalls longer than
coalesce.HORIZON between handling one turn and reading the next (the router's lease upkeep, a
busy event loop shared by both peers, the GIL) finds the window closed and may linger once.
Without the rule the loops below linger on about half (the link) or all (the router) of their
turns: 150 and 100, so the bound still tells the two apart on a busy machine."""


async def test_a_conversation_never_waits_for_the_inbox_linger(settings: Settings,
                                                               sidecar: ClusterSidecar) -> None:
    """Coalescing reads pays for streams nobody waits on; a request/reply loop would only be held
    to the linger's pace by it (a requester's next request follows the answer it just read)."""
    slow = settings.replace(inbox_linger=0.05)  # the longest linger there is
    async with Peer(settings=slow) as asker, Peer(settings=slow) as answerer:
        await answerer.cluster_subscribe("loop.x", lambda m: m.data)
        assert await asker.cluster_request("loop.x", "first", timeout=5) == "first"
        lingered = asker._require_link().lingered, answerer._require_link().lingered
        for n in range(300):
            assert await asker.cluster_request("loop.x", n, timeout=5) == n
        # without the rule about conversations about half of these reads lingered; with it,
        # only a reader that stalled past the window may (see STALLS)
        assert asker._require_link().lingered - lingered[0] <= STALLS
        assert answerer._require_link().lingered - lingered[1] <= STALLS
        # the same reader does wait to gather a fast stream of plain publishes
        got: list[int] = []
        await answerer.cluster_subscribe("flood.x", lambda m: got.append(m.data))
        for n in range(2000):
            await asker.cluster_publish("flood.x", n)
        await async_wait_for(lambda: len(got) == 2000, what="every publish handled")
        assert got == list(range(2000))
        assert answerer._require_link().lingered > lingered[1]


async def test_the_router_does_not_linger_in_a_conversation_either(settings: Settings) -> None:
    """Through the router (SIDECAR_DATA_PATH=routed), the same: a read that held a request or an
    answer is followed by the next at once, while a stream of plain publishes is coalesced."""
    routed = settings.replace(data_path="routed", router_linger=0.05, inbox_linger=0.0)
    sc = ClusterSidecar(settings=routed, run_duties=False)
    await sc.setup()
    try:
        async with Peer(settings=routed) as asker, Peer(settings=routed) as answerer:
            await answerer.cluster_subscribe("loop.x", lambda m: m.data)
            assert asker._require_link().data_path == "routed"
            # the first request of a conversation may come while the router lingers after a
            # burst (it cannot know what it will read next); after that, never again
            assert await asker.cluster_request("loop.x", "first", timeout=5) == "first"
            before = sc.router.lingered
            for n in range(100):
                assert await asker.cluster_request("loop.x", n, timeout=5) == n
            assert sc.router.lingered - before <= STALLS  # without the rule: about one a request
            got: list[int] = []
            await answerer.cluster_subscribe("flood.x", lambda m: got.append(m.data))
            for n in range(2000):
                await asker.cluster_publish("flood.x", n)
            await async_wait_for(lambda: len(got) == 2000, timeout=30, what="every publish handled")
            assert got == list(range(2000))
            assert sc.router.lingered > before
    finally:
        await sc.teardown()
