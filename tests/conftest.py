"""Fixtures: a real Redis started by the suite, a fresh namespace per test, process helpers.

Every test under tests/e2e is marked ``e2e`` here (``make test-fast`` deselects them with ``slow``).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from coordinator.keys import Keys
from coordinator.settings import Settings
from coordinator.sidecar import ClusterSidecar
from ops.embedded import NatsServer, RedisServer
from tests.support import Processes

E2E_DIR = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test collected from tests/e2e ``e2e``: they start real celery processes."""
    for item in items:
        if item.path.resolve().is_relative_to(E2E_DIR):
            item.add_marker(pytest.mark.e2e)


def _running_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One Redis for the session (never a server the suite did not start)."""
    yield from _running_redis()


@pytest.fixture
def fresh_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own, for tests that kill or restart it."""
    yield from _running_redis()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def namespace() -> str:
    """A namespace no other test uses, so tests never see each other's keys."""
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def keys(namespace: str) -> Keys:
    """The key names of this test's namespace."""
    return Keys(namespace)


@pytest.fixture
def settings(redis_url: str, namespace: str) -> Settings:
    return Settings(redis_url=redis_url, namespace=namespace)


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def procs() -> Iterator[Processes]:
    p = Processes()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """One NATS server with JetStream for the session (tests use their own namespaces)."""
    server = NatsServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def second_redis() -> Iterator[RedisServer]:
    """A second Redis for the session: another site's."""
    yield from _running_redis()


@pytest.fixture
async def sidecar(settings: Settings) -> AsyncIterator[ClusterSidecar]:
    """A router only (no duties) in this process, on the test's settings (tests that need another
    kind of sidecar define their own)."""
    sc = ClusterSidecar(settings=settings, run_duties=False)
    await sc.setup()
    try:
        yield sc
    finally:
        await sc.teardown()
