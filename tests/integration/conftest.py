"""Fixtures of the integration tests: a router in this process, for tests that need one."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from coordinator.settings import Settings
from coordinator.sidecar import ClusterSidecar


@pytest.fixture
async def sidecar(settings: Settings) -> AsyncIterator[ClusterSidecar]:
    """A router only (no duties) in this process, on the test's settings."""
    sc = ClusterSidecar(settings=settings, run_duties=False)
    await sc.setup()
    try:
        yield sc
    finally:
        await sc.teardown()
