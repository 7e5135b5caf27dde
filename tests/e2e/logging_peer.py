"""A peer application that sets its logging up as the README tells apps to, for the logging tests.

    python tests/e2e/logging_peer.py

Calls ``coordinator.logs.configure()`` (so ``SIDECAR_LOG_FORMAT`` and ``SIDECAR_LOG_LEVEL`` hold),
joins the cluster named by ``SIDECAR_*`` variables (as ``SIDECAR_PEER_ID`` with its
``SIDECAR_PEER_SECRET`` when given: hardened mode), sends itself one message and, once it came
back, prints ``ready <peer id>``. It stays a member until SIGTERM or SIGINT, when it leaves.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from coordinator.logs import configure
from coordinator.protocol import Message
from coordinator.settings import Settings
from mixin import Agent, SidecarMixin


class LoggingPeer(Agent, SidecarMixin):
    """Nothing but the mixin."""


async def main() -> None:
    settings = Settings.from_env()
    configure(settings, component="app")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    back = asyncio.Event()

    def on_echo(message: Message) -> None:
        back.set()

    async with LoggingPeer(namespace=settings.namespace, settings=settings,
                           id=os.environ.get("SIDECAR_PEER_ID") or None) as peer:
        await peer.cluster_subscribe(f"echo.{peer.id}", on_echo)
        await peer.cluster_publish(f"echo.{peer.id}", {"hello": "me"})
        await asyncio.wait_for(back.wait(), 30)
        logging.getLogger("app").info("echo came back to %s", peer.id)
        print("ready", peer.id, flush=True)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
