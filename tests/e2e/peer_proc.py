"""A publisher peer run as its own process by the end-to-end tests.

    python tests/e2e/peer_proc.py NAME TOPIC COUNT [--chunk K] [--pace SECONDS]

Joins the cluster named by ``SIDECAR_*`` variables, prints ``ready <peer id>``, publishes COUNT
messages ``{"seq": i, "pub": NAME}`` to TOPIC (``K`` publishes gathered at a time, so several are in
flight at once and share a pipeline round trip; ``--pace`` waits that long between chunks so the
stream lasts a while), then ``{"end": True, "pub": NAME}``, prints
``done``, and stays a member until SIGTERM or SIGINT, when it leaves the cluster and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from coordinator.settings import Settings
from mixin import Agent, SidecarMixin


class Publisher(Agent, SidecarMixin):
    """Publishes a numbered stream."""


async def main(name: str, topic: str, count: int, chunk: int, pace: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Agent's namespace defaults to "default", so the one from SIDECAR_NAMESPACE is passed on.
    async with Publisher(namespace=Settings.from_env().namespace, role="publisher",
                         leader_eligible=False) as peer:
        print("ready", peer.id, flush=True)
        for start in range(0, count, chunk):
            # gather() starts them in order: the first writes alone, the rest share one pipeline,
            # so their entries land in the stream in sequence order.
            await asyncio.gather(*(peer.cluster_publish(topic, {"seq": i, "pub": name})
                                   for i in range(start, min(start + chunk, count))))
            if start % 1000 == 0:
                print("published", start, flush=True)
            if pace:
                await asyncio.sleep(pace)
        await peer.cluster_publish(topic, {"end": True, "pub": name})
        print("done", flush=True)
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("topic")
    parser.add_argument("count", type=int)
    parser.add_argument("--chunk", type=int, default=10)
    parser.add_argument("--pace", type=float, default=0.0)
    args = parser.parse_args()
    asyncio.run(main(args.name, args.topic, args.count, args.chunk, args.pace))
