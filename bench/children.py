"""The process harness: every publisher and subscriber runs in its own spawned process.

A scenario is a list of *stages*; each stage is a list of :class:`Role` (a child coroutine function
and its parameters). The children of a stage start together and each reports ``ready`` once it is
set up (registered, subscribed, connected); the next stage starts only then. When every child is
ready, one shared ``go`` event releases them all, and each child's return value comes back as its
result. A child that fails, dies or overruns the scenario's deadline ends the scenario with
:class:`ScenarioFailed`; every child left is terminated by its own process handle.

Timestamps that cross processes use ``time.monotonic_ns()``: CLOCK_MONOTONIC is one system-wide
clock on Linux, so a send time taken in one process and a receive time in another compare directly.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import queue as queue_mod
import time
import traceback
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any

__all__ = ["Channel", "ChildFn", "Role", "ScenarioFailed", "pace", "run_stages"]

log = logging.getLogger("bench")


class ScenarioFailed(RuntimeError):
    """A child process failed, died, or did not finish within the scenario's bound."""


class Channel:
    """A child's line to the parent: report ``ready``, then wait for the shared ``go``."""

    def __init__(self, name: str, queue: Any, go: Any) -> None:
        self.name = name
        self._queue = queue
        self._go = go
        self.cpu_mark = time.process_time()
        """Process CPU time when the child reported ready (its measured work starts after it)."""

    def ready(self) -> None:
        """Tell the parent this child is set up."""
        self.cpu_mark = time.process_time()
        self._queue.put(("ready", self.name, None))

    async def wait_go(self, timeout: float) -> None:
        """Wait (without blocking the event loop) until the parent releases every child."""
        if not await asyncio.to_thread(self._go.wait, timeout):
            raise TimeoutError(f"{self.name}: no go signal within {timeout}s")


ChildFn = Callable[[Channel, Any], Coroutine[Any, Any, dict[str, Any]]]
"""A child: ``async def fn(channel, params) -> result`` at module level (spawn pickles it)."""


@dataclass(frozen=True)
class Role:
    """One child process: its name (unique in the scenario), coroutine function and parameters."""

    name: str
    fn: ChildFn
    params: Any


async def pace(start_ns: int, index: int, rate: float) -> None:
    """Sleep until message ``index`` of a stream paced at ``rate`` per second is due."""
    delay = start_ns + int(index * 1e9 / rate) - time.monotonic_ns()
    if delay > 0:
        await asyncio.sleep(delay / 1e9)


def _child_main(fn: ChildFn, name: str, queue: Any, go: Any, params: Any) -> None:
    """Entry point of a spawned child: run ``fn`` in a fresh event loop, report the outcome."""
    logging.basicConfig(level=logging.WARNING, format=f"[{name}] %(levelname)s %(message)s")
    try:
        channel = Channel(name, queue, go)
        result: dict[str, Any] = asyncio.run(fn(channel, params))
        result["cpu_s"] = time.process_time() - channel.cpu_mark
    except BaseException:  # report everything, KeyboardInterrupt included, then exit
        queue.put(("error", name, traceback.format_exc()))
        return
    queue.put(("result", name, result))


def _collect(queue: Any, procs: dict[str, BaseProcess], waiting: set[str], kind: str,
             deadline: float, results: dict[str, dict[str, Any]], scenario: str) -> None:
    """Read reports until every child in ``waiting`` sent ``kind``; raise on error or timeout."""
    while waiting:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ScenarioFailed(f"{scenario}: {sorted(waiting)} did not report {kind!r} in time")
        try:
            what, name, payload = queue.get(timeout=min(remaining, 0.5))
        except queue_mod.Empty:
            dead = [n for n in waiting if procs[n].exitcode is not None]
            if dead:
                # the report may still be in the pipe: give it a moment before declaring death
                try:
                    what, name, payload = queue.get(timeout=1.0)
                except queue_mod.Empty:
                    codes = [procs[n].exitcode for n in dead]
                    raise ScenarioFailed(f"{scenario}: {dead} exited without a report "
                                         f"(exit codes {codes})") from None
            else:
                continue
        if what == "error":
            raise ScenarioFailed(f"{scenario}: child {name} failed:\n{payload}")
        if what == "result":
            results[name] = payload
        if what == kind or what == "result":
            waiting.discard(name)


def run_stages(scenario: str, stages: Sequence[Sequence[Role]], timeout: float, *,
               before_go: Callable[[], None] | None = None) -> dict[str, dict[str, Any]]:
    """Run the children of ``stages`` (see the module docstring); returns ``{role name: result}``.

    ``before_go`` runs in the parent once every child is ready, before they are released.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    go = ctx.Event()
    procs: dict[str, BaseProcess] = {}
    results: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    finished = False
    try:
        for stage in stages:
            for role in stage:
                proc: BaseProcess = ctx.Process(
                    target=_child_main, name=f"bench-{role.name}", daemon=True,
                    args=(role.fn, role.name, queue, go, role.params))
                proc.start()
                procs[role.name] = proc
            _collect(queue, procs, {r.name for r in stage}, "ready", deadline, results, scenario)
        if before_go is not None:
            before_go()
        go.set()
        _collect(queue, procs, set(procs) - set(results), "result", deadline, results, scenario)
        finished = True
        return results
    finally:
        # after a success the children are exiting; after a failure nothing is worth waiting for
        grace = min(10.0, deadline - time.monotonic()) if finished else 0.0
        for proc in procs.values():
            proc.join(timeout=max(0.1, grace))
            if proc.is_alive():
                log.warning("%s: terminating leftover child %s (pid %s)", scenario, proc.name,
                            proc.pid)
                proc.terminate()
                proc.join(5)
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
        queue.close()
        queue.join_thread()
