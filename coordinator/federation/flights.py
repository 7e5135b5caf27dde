"""Publishing to the namespace's stream in flights: a batch of messages published at once, and
their JetStream acknowledgements awaited together (one wait per flight, not a task per message).
The export sends this site's messages in flights, the intake plain NATS clients' messages."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from coordinator.federation.active import ActiveSite
from coordinator.federation.envelope import Outbound

__all__ = ["ACK_TIMEOUT", "IN_FLIGHT", "Flight", "cancel", "launch", "settled"]

log = logging.getLogger("sidecar.bridge")

ACK_TIMEOUT = 5.0
"""Seconds a JetStream acknowledgement may take before the message is sent again."""
IN_FLIGHT = 8
"""Batches a bridge has published and not yet seen acknowledged, at most."""


@dataclass(slots=True)
class Flight:
    """A batch of inbox entries on its way to NATS: the entries, the messages among them, and the
    futures of their JetStream acknowledgements."""

    entry_ids: list[str]
    messages: list[Outbound]
    futures: list[Awaitable[Any]]


def cancel(futures: list[Any]) -> None:
    """Give up acknowledgements nobody will wait for: a pending nats-py future holds a place
    among the client's unacknowledged publishes until it is done."""
    for future in futures:
        if isinstance(future, asyncio.Future) and not future.done():
            future.cancel()


async def settled(futures: list[Any], timeout: float) -> list[Any]:
    """Each future's result or exception, in order, waiting at most ``timeout`` for all of them
    together; those still pending then (or when the wait is cancelled) are cancelled, freeing
    their room in the client, and count as TimeoutError. One wait for the whole flight, not a
    task per message."""
    if futures:
        try:
            await asyncio.wait(futures, timeout=timeout)
        finally:
            cancel(futures)
    out: list[Any] = []
    for future in futures:
        if future.cancelled():
            out.append(TimeoutError(f"no acknowledgement within {timeout}s"))
        else:
            out.append(future.exception() or future.result())
    return out


async def launch(active: ActiveSite, messages: list[Outbound]) -> list[Awaitable[Any]]:
    """Publish ``messages`` to the stream in order; their acknowledgements' futures (none while
    NATS is away: nothing goes into the client's buffer that could not be recalled)."""
    futures: list[Awaitable[Any]] = []
    try:
        # The client has room for every flight (the bridge sizes it), so a publish waits for room
        # only when acknowledgements went missing; one timeout bounds that wait for the whole
        # batch (nats-py's own wait_stall would start a task per publish to bound it).
        async with asyncio.timeout(ACK_TIMEOUT):
            for m in (messages if active.nc.is_connected else ()):
                futures.append(await active.js.publish_async(m.subject, m.payload,
                                                             headers=m.headers))
    except Exception as exc:  # NATS down, or no room in time: sent again by the caller
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # nats-py reports a cancellation while it waits for room as TooManyStalledMsgs:
            # swallowing it would leave this task running after its group was torn down
            cancel(futures)
            raise asyncio.CancelledError from exc
        log.debug("bridge %s: publish failed: %r", active.name, exc)
    except BaseException:
        cancel(futures)
        raise
    return futures
