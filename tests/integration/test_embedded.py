"""The embedded servers start on free loopback ports, answer, report failures with their log."""

from __future__ import annotations

import asyncio

import nats
import pytest
import redis

from coordinator.errors import SidecarError
from ops.embedded import NatsServer, RedisServer, redis_server_binary


def test_redis_server_starts_answers_and_stops() -> None:
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        assert client.config_get("bind")["bind"].startswith("127.0.0.1")
        client.close()
    assert server.process is not None and server.process.poll() is not None


def test_redis_binary_is_recent_enough() -> None:
    with RedisServer() as server:
        version = redis.Redis.from_url(server.url).info("server")["redis_version"]
    major, minor = (int(x) for x in version.split(".")[:2])
    assert (major, minor) >= (6, 2), f"{redis_server_binary()} is {version}"


def test_start_failure_shows_the_log() -> None:
    with RedisServer() as first:
        clash = RedisServer(port=first.port)
        with pytest.raises(SidecarError, match=r"did not start on port \d+; its log says"):
            clash.start(timeout=5)


def test_nats_server_starts_with_jetstream() -> None:
    async def roundtrip(url: str) -> bytes:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            await js.add_stream(name="probe", subjects=["probe.>"])
            ack = await js.publish("probe.x", b"hello")
            assert ack.seq == 1
            msg = await js.get_msg("probe", 1)
            return bytes(msg.data or b"")
        finally:
            await nc.close()

    with NatsServer() as server:
        assert asyncio.run(roundtrip(server.url)) == b"hello"
