"""The seed's usage example (seed/SIDECAR_ARCHITECTURE.md), as written apart from imports.

No Celery process at all: ``ClusterSidecar.setup()`` routes in the test's own process.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
import redis

from coordinator import ClusterSidecar
from coordinator.cluster.membership import Membership
from coordinator.keys import Keys
from examples.sidecar_conductor import SidecarConductor
from mixin import Message
from tests.e2e.helpers import Peer, Recorder
from tests.support import async_wait_for

logger = logging.getLogger("tests.e2e.seed")


@pytest.fixture
async def seed(monkeypatch: pytest.MonkeyPatch, redis_url: str,
               namespace: str) -> AsyncIterator[tuple[ClusterSidecar, SidecarConductor]]:
    """The "Setting up a Sidecar and Peer" snippet, verbatim but for the namespace."""
    monkeypatch.setenv("SIDECAR_REDIS_URL", redis_url)
    monkeypatch.setenv("SIDECAR_ROUTER_LEASE", "1.0")
    # Create sidecar
    sidecar = ClusterSidecar(
        namespace=namespace,
        logger=logger
    )
    # Create modernized conductor
    conductor = SidecarConductor(
        namespace=namespace,
        logger=logger
    )
    # Setup components
    await sidecar.setup()
    await conductor.setup()
    # Register conductor with sidecar
    await sidecar.register_peer(conductor.id)
    try:
        yield sidecar, conductor
    finally:
        await conductor.teardown()
        await sidecar.teardown()


async def test_seed_usage_example_runs_as_written(
        seed: tuple[ClusterSidecar, SidecarConductor], namespace: str, redis_url: str,
        client: redis.Redis) -> None:
    sidecar, conductor = seed
    assert sidecar.router.running and sidecar.router.partitions == [0]
    tempo_changes: list[Message] = []

    async def handle_tempo_change(message: Message) -> None:
        tempo_changes.append(message)

    async with Peer(namespace=namespace, redis_url=redis_url) as listener:
        beats = Recorder()
        await listener.cluster_subscribe("conductor.heartbeat", beats)

        # --- "Cluster Communication via Sidecar" ---
        # Subscribe to cluster topics
        await conductor.cluster_subscribe("conductor.set_tempo", handle_tempo_change)

        # Publish to cluster
        await conductor.cluster_publish("conductor.heartbeat", {
            "tempo": 120,
            "position": 1000
        })

        # Publish heartbeat with additional data
        await conductor.publish_heartbeat({
            "type": "conductor",
            "status": "active"
        })
        # --- end of the snippet ---

        await beats.wait_for_count(1)
        assert beats.data == [{"tempo": 120, "position": 1000}]
        assert beats.messages[0].sender == conductor.id
        info = Membership(client, Keys(namespace)).info(conductor.id)
        assert info["extra"] == {"type": "conductor", "status": "active"}
        assert info["role"] == "conductor"

        # a set_tempo from another peer runs both the conductor's own handler and the one above
        await listener.cluster_publish("conductor.set_tempo", {"tempo": 140})
        await async_wait_for(lambda: tempo_changes, what="the set_tempo message")
        assert conductor.tempo == 140
        assert tempo_changes[0].data == {"tempo": 140}
        assert tempo_changes[0].sender == listener.id

        # --- "Status Monitoring" ---
        section = sidecar.status["clustersidecar"]
        assert section["managed_peers"] == [conductor.id]
        assert isinstance(section["active_subscriptions"], int)
        # conductor.set_tempo and listener's conductor.heartbeat (plus what peers follow internally)
        assert section["active_subscriptions"] >= 2
        assert section["cluster_size"] == 2
        assert "leader_id" in section
        assert section["leader_id"] in (None, conductor.id, listener.id)

        assert conductor.status == {"sidecarconductor": {
            "tempo": 140,
            "musical_position": 0,
            "time_signature": (4, 4),
            "sidecar_connected": True,
            "cluster_subscriptions": 1,  # one pattern, two handlers
        }}
        await conductor.update(elapsed=1.0)  # the conductor's own beat: 140 bpm for a second
        await beats.wait_for_count(2)
        assert beats.data[-1] == {"tempo": 140, "position": 2}
        assert conductor.status["sidecarconductor"]["musical_position"] == 2

    # the listener left: the sidecar sees it at once
    assert sidecar.status["clustersidecar"]["cluster_size"] == 1


async def test_seed_example_elects_the_conductor_without_celery(
        seed: tuple[ClusterSidecar, SidecarConductor]) -> None:
    # The seed's status output shows a leader, and DESIGN.md says the usage example works with no
    # Celery process at all. GAP (coordinator/sidecar.py, ClusterSidecar.setup): the in-process
    # sidecar routes but runs none of the duties (sweep, elect) that only beat schedules, so without
    # a `celery beat` the leader stays None forever and conductor.is_leader never becomes True.
    sidecar, conductor = seed
    ttl = conductor.sidecar_settings.member_ttl
    await async_wait_for(lambda: sidecar.status["clustersidecar"]["leader_id"] == conductor.id,
                         timeout=ttl + 5, what="the conductor (the only, eligible member) to lead")
    await async_wait_for(lambda: conductor.is_leader, timeout=ttl + 5, what="conductor.is_leader")
