"""The seed's "After (SidecarMixin)" class, run as written apart from imports: NatsMixin and
RedisMixin beside SidecarMixin, with a real NATS server and without one."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import nats
import pytest

from coordinator import ClusterSidecar, Settings, SidecarUnavailable
from mixin import Agent, NatsMixin, RedisMixin, SidecarMixin
from ops.embedded import NatsServer, free_port


class ModernConductor(Agent, NatsMixin, RedisMixin, SidecarMixin):
    def __init__(self, namespace, logger):  # type: ignore[no-untyped-def]
        # Simple initialization, all mixins handle themselves
        super().__init__(namespace=namespace, logger=logger)

    async def setup(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        await self.setup_transport()
        await self.setup_storage()
        await self.setup_sidecar_communication()  # Simple sidecar setup

    async def update(self) -> bool:
        await self.update_transport()
        await self.update_storage()
        await self.publish_heartbeat()  # Simple heartbeat
        return True


@pytest.fixture(scope="module")
def nats_server() -> Iterator[NatsServer]:
    with NatsServer() as server:
        yield server


async def test_the_seed_class_runs_with_nats(settings: Settings, sidecar: ClusterSidecar,
                                             nats_server: NatsServer,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDECAR_REDIS_URL", str(settings.redis_url))
    monkeypatch.setenv("SIDECAR_NATS_URL", nats_server.url)
    c = ModernConductor(settings.namespace, logging.getLogger("test"))
    await c.setup()
    plain = await nats.connect(nats_server.url)
    try:
        assert c.connected and c.sidecar_connected
        assert await c.update() is True
        # publish: a dict as JSON, a str as UTF-8, bytes as they are, on <namespace>.<topic>
        got: list[bytes] = []

        async def record(m: Any) -> None:
            got.append(m.data)

        sub = await plain.subscribe(f"{settings.namespace}.conductor.tempo", cb=record)
        await plain.flush()
        await c.publish("conductor.tempo", {"bpm": 120})
        await c.publish("conductor.tempo", "fast")
        await c.publish("conductor.tempo", b"\x00raw")
        with pytest.raises(TypeError, match="dict, a str or bytes"):
            await c.publish("conductor.tempo", 42)
        await c.update_transport()
        await asyncio.wait_for(_until(lambda: len(got) >= 3), 5)
        assert got == [b'{"bpm":120}', b"fast", b"\x00raw"]
        await sub.unsubscribe()
        # subscribe / unsubscribe
        heard: list[Any] = []
        await c.subscribe("cues.>", lambda m: heard.append(m.data))
        await plain.publish(f"{settings.namespace}.cues.start", b"go")
        await plain.flush()
        await asyncio.wait_for(_until(lambda: heard), 5)
        assert heard == [b"go"]
        await c.unsubscribe("cues.>")
        # storage: under the peer's own root, JSON values
        assert await c.set("tempo", 120) and await c.get("tempo") == 120
        assert not await c.set("tempo", 90, nx=True) and await c.get("tempo") == 120
        assert await c.set("ephemeral", {"a": 1}, ttl=60) and await c.exists("ephemeral")
        assert await c.keys() == ["ephemeral", "tempo"]
        assert await c.delete("ephemeral") and await c.get("ephemeral", "gone") == "gone"
    finally:
        await plain.close()
        await c.teardown()
    assert not c.connected
    with pytest.raises(SidecarUnavailable, match="setup_storage"):
        await c.get("tempo")


@pytest.mark.slow  # three bounded tries at an unreachable NATS
async def test_the_seed_class_runs_without_nats_and_carries_on_when_nats_is_down(
        settings: Settings, sidecar: ClusterSidecar, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("SIDECAR_REDIS_URL", str(settings.redis_url))
    monkeypatch.delenv("SIDECAR_NATS_URL", raising=False)
    c = ModernConductor(settings.namespace, logging.getLogger("test"))
    await c.setup()  # no NATS configured: a no-op
    try:
        assert not c.connected and c.sidecar_connected
        assert await c.update() is True
        with pytest.raises(SidecarUnavailable, match="not connected to NATS"):
            await c.publish("x", "y")
    finally:
        await c.teardown()
    dead = f"nats://127.0.0.1:{free_port()}"
    monkeypatch.setenv("SIDECAR_NATS_URL", dead)
    d = ModernConductor(settings.namespace, logging.getLogger("test"))
    with caplog.at_level(logging.WARNING):
        await d.setup()  # unreachable: a few tries, then a warning, not an exception
    try:
        assert not d.connected and d.sidecar_connected
        assert "carrying on offline" in caplog.text
    finally:
        await d.teardown()


async def _until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0.01)
