"""Shared pieces of the end-to-end tests: a bare peer, a recording handler, worker start-up, waiting
until workers route, running the ``sidecar`` command."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping
from typing import Any

import redis

from coordinator.keys import Keys
from coordinator.leases import LeaseToken
from mixin import Message
from tests.support import VENV_BIN, Peer, Processes, async_wait_for, wait_for

__all__ = ["SIDECAR", "Peer", "Recorder", "holders", "lease_holder", "routing", "sidecar_cli", "start_worker",
           "wait_until_routing"]

SIDECAR = VENV_BIN / "sidecar"


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


def holders(client: redis.Redis, namespace: str, partitions: int = 1) -> dict[int, str]:
    """Partition -> name of the worker whose router holds its lease ('' when nobody does)."""
    keys = Keys(namespace)
    tokens = [LeaseToken.parse(t) for t in client.mget([keys.router_lease(p) for p in range(partitions)])]
    return {p: t.name.split("@", 1)[0] if t else "" for p, t in enumerate(tokens)}


def routing(procs: Processes, started: Mapping[str, subprocess.Popen[bytes]],
            condition: Callable[[], Any]) -> Callable[[], Any]:
    """``condition`` as a poll for :func:`wait_for`/:func:`async_wait_for` that fails at once, with
    its log, when any process in ``started`` (name -> process) has exited while waiting."""
    def poll() -> Any:
        for name, proc in started.items():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{procs.log(proc)}")
        return condition()
    return poll


def wait_until_routing(procs: Processes, started: Mapping[str, subprocess.Popen[bytes]],
                       condition: Callable[[], Any], timeout: float = 30.0,
                       what: str = "the workers to route") -> None:
    """Wait until ``condition`` holds (typically: these workers hold these router leases) while
    every process in ``started`` keeps running."""
    wait_for(routing(procs, started, condition), timeout, interval=0.02, what=what)


def start_worker(procs: Processes, env: dict[str, str], client: redis.Redis, name: str,
                 *, owns: bool = True, timeout: float = 30.0) -> subprocess.Popen[bytes]:
    """Start ``celery -A workers worker -n <name>@%h``; wait until it routes (``owns``) or is a router.

    With ``owns`` it waits until this worker holds the partition 0 lease; otherwise until it has
    announced itself in the routers set (a standby).
    """
    proc = procs.worker(env, name)
    ns = env["SIDECAR_NAMESPACE"]

    def ready() -> bool:
        if owns:
            return holders(client, ns)[0] == name
        return any(str(r).startswith(f"{name}@") for r in client.zrange(Keys(ns).routers, 0, -1))

    wait_until_routing(procs, {f"worker {name}": proc}, ready, timeout,
                       what=f"worker {name} to start routing")
    return proc


def sidecar_cli(env: dict[str, str], *args: str, stdin: str | None = None) -> str:
    """Run ``sidecar ARGS``; return its output (fails the test on a non-zero exit)."""
    done = subprocess.run([str(SIDECAR), *args], env=env, input=stdin, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, f"sidecar {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout
