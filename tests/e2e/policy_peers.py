"""Many lightweight peers in one process (one event loop), for the policy rollout tests.

    python tests/e2e/policy_peers.py COUNT REPORT_KEY [--strict N]

Joins COUNT peers to the cluster named by ``SIDECAR_*`` variables and prints ``peer <id> <kind>``
for each (kind ``strict`` or ``easy``), then ``ready``. Every peer records the ``data`` of each
policy set it applies in the Redis hash REPORT_KEY (peer id -> JSON ``{name: data}``). The first N
peers are strict: their ``on_policy`` hook refuses a set in which some document's ``data`` lacks
``tempo``. On SIGTERM or SIGINT every peer leaves the cluster and the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from typing import Any

import redis.asyncio as aioredis

from coordinator.settings import Settings
from mixin import Agent, SidecarMixin


class RolloutPeer(Agent, SidecarMixin):
    """Applies policy sets, recording what it applied; a strict one insists on ``data.tempo``."""

    def __init__(self, *args: Any, report: aioredis.Redis, report_key: str, strict: bool,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.report = report
        self.report_key = report_key
        self.strict = strict

    async def on_policy(self, policies: dict[str, Any]) -> None:
        if self.strict:
            for name, doc in policies.items():
                if "tempo" not in (doc.get("data") or {}):
                    raise ValueError(f"policy {name!r} lacks data.tempo")
        applied = {name: doc.get("data") for name, doc in policies.items()}
        await self.report.hset(self.report_key, self.id, json.dumps(applied))


async def main(count: int, report_key: str, strict: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    settings = Settings.from_env()
    report = aioredis.Redis.from_url(settings.redis_url or "", decode_responses=True)
    peers = [RolloutPeer(namespace=settings.namespace, settings=settings, report=report,
                         report_key=report_key, strict=i < strict, leader_eligible=False)
             for i in range(count)]
    try:
        await asyncio.gather(*(p.setup() for p in peers))
        for p in peers:
            print("peer", p.id, "strict" if p.strict else "easy", flush=True)
        print("ready", flush=True)
        await stop.wait()
    finally:
        await asyncio.gather(*(p.teardown() for p in peers), return_exceptions=True)
        await report.aclose()
    print("left", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("count", type=int)
    parser.add_argument("report_key")
    parser.add_argument("--strict", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(main(args.count, args.report_key, args.strict))
