"""Entries handed from a peer's reader to its handler task (mixin.handing): in order, the
reader waits for them unless an answer is awaited, and a failure drops everything after it
for the reader to read again."""

from __future__ import annotations

import asyncio

from mixin.handing import Handing


async def test_entries_are_handled_in_order_and_the_reader_waits_for_them() -> None:
    seen: list[str] = []

    async def handle(eid: str, fields: dict[str, str]) -> bool:
        await asyncio.sleep(0)
        seen.append(eid)
        return eid != "2-0"  # 2-0 is not settled yet (being retried, say)

    h = Handing(handle)
    task = asyncio.create_task(h.run())
    for eid in ("1-0", "2-0", "3-0"):
        h.put(eid, {})
    h.put("1-0", {})  # read again while queued: skipped
    await h.handled(lambda: False)
    assert seen == ["1-0", "2-0", "3-0"] and h.settled() == ["1-0", "3-0"]
    task.cancel()


async def test_the_reader_reads_on_while_an_answer_is_awaited() -> None:
    release = asyncio.Event()

    async def handle(eid: str, fields: dict[str, str]) -> bool:
        await release.wait()  # a handler awaiting an answer only the reader can bring
        return True

    h = Handing(handle)
    task = asyncio.create_task(h.run())
    h.put("1-0", {})
    awaited = [False]
    waiting = asyncio.create_task(h.handled(lambda: awaited[0]))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    awaited[0] = True
    h.wake()
    await asyncio.wait_for(waiting, 1)
    release.set()
    task.cancel()


async def test_a_failure_drops_what_follows_until_the_reader_takes_note() -> None:
    seen: list[str] = []

    async def handle(eid: str, fields: dict[str, str]) -> bool:
        seen.append(eid)
        if eid == "1-0":
            raise ConnectionError("Redis went away")
        return True

    h = Handing(handle)
    task = asyncio.create_task(h.run())
    h.put("1-0", {})
    h.put("2-0", {})
    await h.handled(lambda: False)
    assert isinstance(h.failed, ConnectionError) and seen == ["1-0"]
    h.put("3-0", {})  # read while the failure waits: left for the reader to read again
    assert h.settled() == []
    h.failed = None  # the reader took note; it reads 1-0 onwards again, in order
    h.put("1-0", {})
    await h.handled(lambda: False)
    assert seen == ["1-0", "1-0"]
    task.cancel()
