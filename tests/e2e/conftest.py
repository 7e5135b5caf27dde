"""Fixtures of the end-to-end tests (every test here is marked ``e2e`` by tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.election_peer import stop_all
from tests.support import Processes


@pytest.fixture
def stop_peers_first(procs: Processes) -> Iterator[None]:
    """When the test ends, stop what it started in a fast order (peers, then beats, then workers:
    see :func:`stop_all`) before ``procs`` kills whatever is left. Use it with
    ``pytestmark = pytest.mark.usefixtures("stop_peers_first")``."""
    yield
    stop_all(procs)
