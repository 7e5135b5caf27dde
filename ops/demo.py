"""The demo peers: the seed's ``SidecarConductor`` and a follower that tracks it.

Part of the installed package, so ``sidecar up`` runs them from a wheel as from a checkout. Run one
of each as processes (``sidecar up`` does)::

    python -m ops.demo conductor
    python -m ops.demo follower --nudge-every 5

Each leaves the cluster at once on SIGTERM or SIGINT (:func:`run`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from typing import Any

from coordinator.aio import reap
from coordinator.logs import configure
from coordinator.settings import Settings
from mixin import Agent, Message, SidecarMixin, StatusField

__all__ = ["SidecarConductor", "SidecarFollower", "run"]


class SidecarConductor(Agent, SidecarMixin):
    """Keeps musical time for the cluster: publishes ``conductor.heartbeat``, obeys ``set_tempo``."""

    tempo = StatusField(120, doc="beats per minute")
    musical_position = StatusField(0, doc="beats since the start")
    time_signature = StatusField((4, 4))

    def __init__(self, namespace: str | None = None, logger: logging.Logger | None = None,
                 **kwargs: Any) -> None:
        super().__init__(namespace=namespace, logger=logger, role="conductor", priority=10, **kwargs)

    async def setup(self, *args: Any, **kwargs: Any) -> None:
        await super().setup(*args, **kwargs)
        await self.cluster_subscribe("conductor.set_tempo", self.handle_tempo_change)

    async def handle_tempo_change(self, message: Message) -> None:
        tempo = message.data.get("tempo") if isinstance(message.data, dict) else None
        if isinstance(tempo, int | float) and 20 <= tempo <= 400:
            self.tempo = int(tempo)
            self.logger.info("tempo set to %d by %s", self.tempo, message.sender[-6:])
        else:
            self.logger.warning("ignored set_tempo with %r", message.data)

    async def update(self, elapsed: float = 1.0) -> bool:
        self.musical_position += round(self.tempo * elapsed / 60)
        await self.cluster_publish("conductor.heartbeat",
                                   {"tempo": self.tempo, "position": self.musical_position})
        await self.publish_heartbeat({"type": "conductor", "status": "active"})
        return True


class SidecarFollower(Agent, SidecarMixin):
    """Follows the conductor's heartbeat; every ``nudge_every`` beats it asks for a new tempo."""

    tempo = StatusField(0)
    musical_position = StatusField(0)
    beats_heard = StatusField(0)

    def __init__(self, namespace: str | None = None, logger: logging.Logger | None = None,
                 nudge_every: int = 0, **kwargs: Any) -> None:
        super().__init__(namespace=namespace, logger=logger, role="follower", **kwargs)
        self.nudge_every = nudge_every

    async def setup(self, *args: Any, **kwargs: Any) -> None:
        await super().setup(*args, **kwargs)
        await self.cluster_subscribe("conductor.heartbeat", self.on_beat)

    def on_beat(self, message: Message) -> None:
        if not self.beats_heard:
            self.logger.info("following the conductor at tempo %s (from site %s)",
                             message.data["tempo"], message.site or "here")
        self.tempo = message.data["tempo"]
        self.musical_position = message.data["position"]
        self.beats_heard += 1

    async def update(self, elapsed: float = 1.0) -> bool:
        await self.publish_heartbeat({"type": "follower", "tempo": self.tempo})
        if self.nudge_every and self.beats_heard and self.beats_heard % self.nudge_every == 0:
            new = 90 if self.tempo >= 120 else 140
            await self.cluster_publish("conductor.set_tempo", {"tempo": new})
        return True


async def run(peer: Agent, interval: float = 1.0) -> None:
    """Set ``peer`` up, call ``update()`` every ``interval`` until SIGINT/SIGTERM, tear it down."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with peer:
        while not stop.is_set():
            # An update waits while Redis is away; a stop request must not wait with it.
            work = asyncio.ensure_future(peer.update())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                await reap(work)
                stopping.cancel()
                break
            stopping.cancel()
            if work.exception() is not None:
                peer.logger.warning("update failed: %s", work.exception())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", choices=["conductor", "follower"])
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--nudge-every", type=int, default=0)
    args = parser.parse_args()
    settings = Settings.from_env()
    # the sidecar's one log format (SIDECAR_LOG_FORMAT), at SIDECAR_LOG_LEVEL or info
    configure(settings, component=args.role, level=None if settings.log_level else "info")
    peer: Agent
    if args.role == "conductor":
        peer = SidecarConductor(namespace=settings.namespace)
    else:
        peer = SidecarFollower(namespace=settings.namespace, nudge_every=args.nudge_every)
    asyncio.run(run(peer, args.interval))


if __name__ == "__main__":
    main()
