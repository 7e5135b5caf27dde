"""A peer process for the failover benchmarks: records what it sees, with a system-wide clock.

``python -m bench.ha_peer OUT`` runs one peer (settings from ``SIDECAR_*``) and appends JSON lines to
``OUT``: ``{"t": <time.monotonic()>, "peer": id, "leader": id, "term": n}`` whenever its view of the
leader changes, ``{"t": ..., "left": peer_id}`` for every ``cluster.member.left`` it receives, and
``{"t": ..., "belief": "start"|"end", "term": n}`` as its own ``is_leader`` turns on and off (sampled
every 5 ms by :class:`bench.belief.BeliefSampler`).
``time.monotonic()`` is CLOCK_MONOTONIC, shared by every process on Linux, so the parent can
subtract its own kill time. It runs until SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from typing import Any

from bench.belief import BeliefSampler, Interval
from mixin import Agent, Message, SidecarMixin

__all__ = ["HaPeer"]


class HaPeer(Agent, SidecarMixin):
    """Writes its leader view and the member-left events it hears to a file."""

    def __init__(self, out: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out = out

    def write(self, record: dict[str, Any]) -> None:
        self.out.write(json.dumps({"t": time.monotonic(), **record}) + "\n")
        self.out.flush()

    async def on_leader_change(self, leader_id: str | None, term: int) -> None:
        self.write({"peer": self.id, "leader": leader_id, "term": term})

    def on_left(self, message: Message) -> None:
        self.write({"left": message.data.get("peer_id")})

    def on_belief(self, kind: str, interval: Interval) -> None:
        at = interval.start if kind == "start" else interval.end
        self.out.write(json.dumps({"t": at, "belief": kind, "term": interval.term}) + "\n")
        self.out.flush()


async def main(path: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    from coordinator.settings import Settings

    with open(path, "a", encoding="utf-8") as out:
        peer = HaPeer(out, namespace=Settings.from_env().namespace)
        sampler = BeliefSampler(lambda: [(peer.id, peer)], on_change=peer.on_belief)
        sampling = asyncio.create_task(sampler.run(stop))  # from before it registers
        await peer.setup()
        await peer.cluster_subscribe("cluster.member.left", peer.on_left)
        peer.write({"ready": peer.id})
        await stop.wait()
        await sampling
        await peer.teardown()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
