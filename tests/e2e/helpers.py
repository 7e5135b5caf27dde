"""Shared pieces of the end-to-end tests: a bare peer, a recording handler, worker start-up."""

from __future__ import annotations

import subprocess
from typing import Any

import redis

from coordinator.keys import Keys
from mixin import Agent, Message, SidecarMixin
from tests.support import Processes, async_wait_for, wait_for


class Peer(Agent, SidecarMixin):
    """A peer with nothing but the mixin."""


class Recorder:
    """A plain handler that records every message it is called with, in call order."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    def __call__(self, message: Message) -> None:
        self.messages.append(message)

    @property
    def data(self) -> list[Any]:
        return [m.data for m in self.messages]

    async def wait_for_count(self, n: int, timeout: float = 10.0) -> None:
        await async_wait_for(lambda: len(self.messages) >= n, timeout,
                             what=f"{n} messages (have {len(self.messages)})")

    async def wait_for_data(self, data: Any, timeout: float = 10.0) -> None:
        await async_wait_for(lambda: data in self.data, timeout, what=f"a message carrying {data!r}")


def lease_holder(client: redis.Redis, namespace: str, partition: int = 0) -> str:
    """Token of the router holding ``partition`` ('' when nobody does)."""
    return str(client.get(Keys(namespace).router_lease(partition)) or "")


def start_worker(procs: Processes, env: dict[str, str], client: redis.Redis, name: str,
                 *, owns: bool = True, timeout: float = 30.0) -> subprocess.Popen[bytes]:
    """Start ``celery -A workers worker -n <name>@%h``; wait until it routes (``owns``) or is a router.

    With ``owns`` it waits until this worker holds the partition 0 lease; otherwise until it has
    announced itself in the routers set (a standby).
    """
    proc = procs.worker(env, name)
    ns = env["SIDECAR_NAMESPACE"]

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"worker {name} exited with {proc.returncode}:\n{procs.log(proc)}")
        if owns:
            return lease_holder(client, ns).startswith(f"{name}@")
        return any(str(r).startswith(f"{name}@") for r in client.zrange(Keys(ns).routers, 0, -1))

    wait_for(ready, timeout, interval=0.02, what=f"worker {name} to start routing")
    return proc
