"""A SidecarMixin peer run as its own process, and the handle the election tests drive it with.

Run as ``python -m tests.e2e.election_peer --out FILE`` with the ``SIDECAR_*`` environment of
:func:`tests.support.sidecar_env`. The peer registers through the running worker, then writes one
JSON line to ``FILE`` for everything a test may want to check. Every line also carries ``mono``, the
peer's ``time.monotonic()``: CLOCK_MONOTONIC is system-wide, so it compares with the test's clock.

    {"ev": "ready", "id": ..., "pid": ...}                   registered (setup() returned)
    {"ev": "leader", "leader": ..., "term": ..., "is_leader": ...}   its leader view changed
    {"ev": "state", "ref": ..., "leader": ..., "term": ..., "is_leader": ...}   answer to "state"
    {"ev": "msg", "topic": ..., "data": ..., "sender": ..., "id": ..., "ts": ...}   a delivery
    {"ev": "fenced", "seq": ..., "term": ..., "ok": true | false, "error": ...}   a fenced publish
    {"ev": "forged", "ref": ..., "entry": ...}                a raw fenced entry written (see below)
    {"ev": "done", "ref": ...}                                a command finished
    {"ev": "left"}                                            torn down (left the cluster)

Commands arrive as JSON objects on the Redis list :func:`command_key` (a test-only key, outside the
sidecar's key space), so they reach a peer that was paused and resumed in the order they were sent:

    {"op": "state", "ref": r}                   record the current leader view and is_leader
    {"op": "subscribe", "pattern": p, "ref": r} record every message matching ``p``
    {"op": "fenced_stream", "topic": t, "interval": s}   try cluster_publish(t, ..., fenced=True)
                                                every ``s`` seconds and record each outcome
    {"op": "forge_fenced", "topic": t, "term": n, "ref": r}   write a fenced publish claiming term
                                                ``n`` straight to the request stream, bypassing the
                                                mixin's own is_leader check (tests the router's fence)
    {"op": "leave"}                             tear down (graceful leave) and exit 0

SIGTERM also tears the peer down gracefully; SIGKILL is how tests make it die without leaving.

The test side: :func:`start_peer` returns a :class:`PeerHandle` (events, leader view, commands);
:func:`start_sidecar` starts workers and beats; :func:`stop_all` stops everything in a fast order.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import IO, Any

import redis
import redis.asyncio as aioredis

from coordinator.errors import NotLeader, SidecarError
from coordinator.keys import Keys
from coordinator.protocol import Message, dumps
from coordinator.settings import Settings
from mixin import Agent, SidecarMixin
from tests.e2e.helpers import holders, wait_until_routing
from tests.support import Processes, wait_for

__all__ = ["ElectionPeer", "PeerHandle", "command_key", "leader_record", "members", "start_peer",
           "start_sidecar", "stop_all", "wait_ready"]

MODULE = "tests.e2e.election_peer"


def command_key(namespace: str, peer_id: str) -> str:
    """The Redis list a test pushes commands for ``peer_id`` to (test-only, not a sidecar key)."""
    return f"sidecar-test:{{{namespace}}}:commands.{peer_id}"


# ---------------------------------------------------------------------- the peer process
class ElectionPeer(Agent, SidecarMixin):
    """A peer that records its leader view and deliveries as JSON lines."""

    def __init__(self, *args: Any, out: IO[str], **kwargs: Any) -> None:
        self.out = out
        super().__init__(*args, **kwargs)

    def record(self, ev: str, **fields: Any) -> None:
        self.out.write(dumps({"ev": ev, "mono": time.monotonic(), **fields}) + "\n")
        self.out.flush()

    async def on_leader_change(self, leader_id: str | None, term: int) -> None:
        self.record("leader", leader=leader_id, term=term, is_leader=self.is_leader)

    def on_message(self, message: Message) -> None:
        self.record("msg", topic=message.topic, data=message.data, sender=message.sender,
                    id=message.id, ts=message.timestamp)

    async def fenced_stream(self, topic: str, interval: float) -> None:
        seq = 0
        while True:
            seq += 1
            term = self.leader_term
            try:
                await self.cluster_publish(topic, {"seq": seq, "term": term}, fenced=True)
                self.record("fenced", seq=seq, term=term, ok=True)
            except SidecarError as exc:
                self.record("fenced", seq=seq, term=term, ok=False, error=type(exc).__name__)
            await asyncio.sleep(interval)

    async def forge_fenced(self, topic: str, term: int, data: Any) -> str:
        """Send a fenced publish past the local leadership check; returns what its dead letter
        will name: the message id on the direct path (refused at the call), else the entry id."""
        link = self._require_link()
        mid = self._ids.next()
        try:
            entry = await link.write({"k": "pub", "s": self.id, "t": topic, "d": dumps(data),
                                      "i": mid, "f": str(term)})
        except NotLeader:
            return mid
        return mid if link.data_path == "direct" else entry


async def _commands(peer: ElectionPeer, url: str, stop: asyncio.Event) -> None:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    key = command_key(peer.namespace, peer.id)
    background: list[asyncio.Task[None]] = []
    try:
        while not stop.is_set():
            item = await client.blpop([key], timeout=1)
            if item is None:
                continue
            cmd = json.loads(item[1])
            op, ref = cmd.get("op"), cmd.get("ref")
            if op == "state":
                peer.record("state", ref=ref, leader=peer.leader_id, term=peer.leader_term,
                            is_leader=peer.is_leader)
            elif op == "subscribe":
                await peer.cluster_subscribe(cmd["pattern"], peer.on_message)
                peer.record("done", ref=ref)
            elif op == "fenced_stream":
                background.append(asyncio.create_task(
                    peer.fenced_stream(cmd["topic"], float(cmd.get("interval", 0.02)))))
            elif op == "forge_fenced":
                entry = await peer.forge_fenced(cmd["topic"], int(cmd["term"]), cmd.get("data"))
                peer.record("forged", ref=ref, entry=entry)
            elif op == "leave":
                stop.set()
            else:
                peer.record("error", ref=ref, message=f"unknown op {op!r}")
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await client.aclose()


async def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog=MODULE)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings.from_env()
    assert settings.redis_url
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with open(args.out, "a", encoding="utf-8") as out:
        peer = ElectionPeer(namespace=settings.namespace, out=out, settings=settings)
        await peer.setup()
        peer.record("ready", id=peer.id, pid=os.getpid())
        commands = asyncio.create_task(_commands(peer, settings.redis_url, stop))
        await stop.wait()
        commands.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await commands
        await peer.teardown()
        peer.record("left")


# ---------------------------------------------------------------------- the test side
class PeerHandle:
    """One running election peer: its process, id, recorded events and command list."""

    def __init__(self, procs: Processes, proc: subprocess.Popen[bytes], out: Path, client: redis.Redis,
                 namespace: str) -> None:
        self.procs = procs
        self.proc = proc
        self.out = out
        self.client = client
        self.namespace = namespace
        self.id = ""
        self._events: list[dict[str, Any]] = []
        self._offset = 0

    def events(self, ev: str | None = None) -> list[dict[str, Any]]:
        """Every event recorded so far (complete lines only), optionally of one kind."""
        if self.out.exists():
            with open(self.out, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
            end = chunk.rfind(b"\n") + 1
            for line in chunk[:end].splitlines():
                self._events.append(json.loads(line))
            self._offset += end
        return [e for e in self._events if ev is None or e["ev"] == ev]

    def view(self) -> tuple[str | None, int]:
        """The peer's leader view as last recorded: (leader id, term)."""
        changes = self.events("leader")
        return (changes[-1]["leader"], changes[-1]["term"]) if changes else (None, 0)

    def messages(self, topic_prefix: str = "") -> list[dict[str, Any]]:
        return [e for e in self.events("msg") if e["topic"].startswith(topic_prefix)]

    def send(self, op: str, **fields: Any) -> str:
        """Push a command; returns its ref (the matching event carries it)."""
        ref = uuid.uuid4().hex[:8]
        self.client.rpush(command_key(self.namespace, self.id), dumps({"op": op, "ref": ref, **fields}))
        return ref

    def reply(self, ref: str, timeout: float = 10.0) -> dict[str, Any]:
        """Wait for the event answering command ``ref``."""
        def found() -> dict[str, Any] | None:
            self.check_alive()
            return next((e for e in self.events() if e.get("ref") == ref), None)
        result: dict[str, Any] = wait_for(found, timeout, what=f"peer {self.id} to answer {ref}")
        return result

    def state(self, timeout: float = 10.0) -> dict[str, Any]:
        """The peer's leader view and is_leader, asked now."""
        return self.reply(self.send("state"), timeout)

    def subscribe(self, pattern: str) -> None:
        self.reply(self.send("subscribe", pattern=pattern))

    def leave(self, timeout: float = 15.0) -> None:
        """Graceful teardown; returns once the process exited cleanly."""
        self.send("leave")
        assert self.proc.wait(timeout) == 0, self.procs.log(self.proc)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"peer {self.id or '?'} exited with {self.proc.returncode}:\n"
                                 f"{self.procs.log(self.proc)}")

    def __repr__(self) -> str:
        return f"PeerHandle({self.id[-6:]!r}, pid={self.proc.pid})"


def start_peer(procs: Processes, env: dict[str, str], client: redis.Redis, name: str) -> PeerHandle:
    """Start an election peer process; return once it has registered."""
    out = procs.dir / f"{name}.jsonl"
    proc = procs.python(env, name, "-m", MODULE, "--out", str(out))
    return wait_ready(PeerHandle(procs, proc, out, client, env["SIDECAR_NAMESPACE"]))


def wait_ready(handle: PeerHandle, timeout: float = 20.0) -> PeerHandle:
    """Wait until ``handle``'s peer reported it registered; fills in its id."""
    def ready() -> dict[str, Any] | None:
        handle.check_alive()
        return next(iter(handle.events("ready")), None)
    handle.id = wait_for(ready, timeout, interval=0.02, what=f"peer {handle.proc.pid} to register")["id"]
    return handle


def start_sidecar(procs: Processes, env: dict[str, str], client: redis.Redis, *,
                  workers: tuple[str, ...] = ("w1",), beats: tuple[str, ...] = ("beat",),
                  timeout: float = 30.0) -> dict[str, subprocess.Popen[bytes]]:
    """Start workers and beats; return once a worker routes partition 0 and a beat holds the lease."""
    namespace = env["SIDECAR_NAMESPACE"]
    started = {name: procs.worker(env, name) for name in workers}
    started.update({name: procs.beat(env, name) for name in beats})

    def ready() -> bool:
        routes = holders(client, namespace)[0] in workers
        return routes and (not beats or client.get(Keys(namespace).beat_lease) is not None)

    wait_until_routing(procs, started, ready, timeout,
                       what="the worker to route and a beat to hold its lease")
    return started


def stop_all(procs: Processes) -> None:
    """Stop what ``procs`` started, fast: peers first (their leave still has a router to answer it),
    then beats, then workers; SIGTERM each group at once and wait for all of it.
    """
    def group(proc: subprocess.Popen[bytes]) -> int:
        args = {str(a) for a in (proc.args if isinstance(proc.args, list) else [proc.args])}
        return 2 if "worker" in args else 1 if "beat" in args else 0

    for rank in range(3):
        batch = [p for p in procs.procs if p.poll() is None and group(p) == rank]
        for proc in batch:
            for sig in (signal.SIGCONT, signal.SIGTERM):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
        for proc in batch:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                procs.kill(proc)


def members(client: redis.Redis, namespace: str) -> set[str]:
    """Ids in the members zset now."""
    return {str(m) for m in client.zrange(Keys(namespace).members, 0, -1)}


def leader_record(client: redis.Redis, namespace: str) -> tuple[str | None, int]:
    """(leader id or None, term) from the leader hash now."""
    leader, term = client.hmget(Keys(namespace).leader, "id", "term")
    return (str(leader) if leader else None), int(term or 0)


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1:]))
