"""A queue group member run as its own process by the end-to-end tests.

    python tests/e2e/queue_member.py PATTERN QUEUE [--stall]

Joins the cluster named by ``SIDECAR_*`` variables, subscribes to PATTERN in queue group QUEUE,
prints ``ready <peer id>``, and prints ``handled <n>`` for every message ``{"n": ...}`` it handles.
With ``--stall`` its handler never returns, so everything handed to it stays unhandled (the test
then SIGKILLs it).
"""

from __future__ import annotations

import argparse
import asyncio

from coordinator.settings import Settings
from mixin import Agent, Message, SidecarMixin


class Member(Agent, SidecarMixin):
    """One member of a queue group."""


async def main(pattern: str, queue: str, stall: bool) -> None:
    forever = asyncio.Event()

    async def handle(m: Message) -> None:
        if stall:
            print("stalled", m.data["n"], flush=True)
            await forever.wait()
        print("handled", m.data["n"], flush=True)

    async with Member(namespace=Settings.from_env().namespace, leader_eligible=False) as peer:
        await peer.cluster_subscribe(pattern, handle, queue=queue)
        print("ready", peer.id, flush=True)
        await forever.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("pattern")
    parser.add_argument("queue")
    parser.add_argument("--stall", action="store_true")
    args = parser.parse_args()
    asyncio.run(main(args.pattern, args.queue, args.stall))
