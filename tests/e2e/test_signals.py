"""SIGTERM (how Docker and systemd stop a service) and SIGINT make a peer process leave the cluster
at once: its member record goes with a ``leave`` event, not by expiry.

The router runs in the test's own process without duties, so no sweep could expire anybody: a
member record that disappears was removed by the peer's own leave request.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import redis

from coordinator.keys import Keys
from coordinator.settings import Settings
from tests.e2e.helpers import SIDECAR
from tests.support import Processes, sidecar_env, wait_for


def the_member(client: redis.Redis, keys: Keys, proc: subprocess.Popen[bytes],
               procs: Processes) -> str:
    """The id of the one member the process registered (it is alone in the namespace)."""
    def joined() -> str:
        if proc.poll() is not None:
            raise AssertionError(f"the peer exited with {proc.returncode}:\n{procs.log(proc)}")
        members = client.zrange(keys.members, 0, -1)
        return str(members[0]) if len(members) == 1 else ""
    return str(wait_for(joined, timeout=30, what="the peer to register"))


def left_events(client: redis.Redis, keys: Keys, peer: str) -> list[str]:
    """The reasons of every ``left`` event of ``peer`` in the events stream."""
    return [f["reason"] for _, f in client.xrange(keys.events)
            if f.get("event") == "left" and f.get("peer") == peer]


PROGRAMS = {
    # a peer application written as the README shows: asyncio.run(main()) and `async with`
    "own application": ["-m", "examples.job_board", "worker-7"],
    # the demo `sidecar up` runs (it handles the signals itself)
    "demo conductor": ["-m", "ops.demo", "conductor"],
}


@pytest.mark.usefixtures("sidecar")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("program", [*sorted(PROGRAMS), "sidecar tail"])
def test_a_stopped_peer_process_leaves_at_once(procs: Processes, settings: Settings,
                                               client: redis.Redis, program: str,
                                               sig: signal.Signals) -> None:
    keys = Keys(settings.namespace)
    # a member TTL far longer than the test waits: only a leave can remove the record in time
    env = sidecar_env(settings.redis_url or "", settings.namespace, member_ttl=30)
    if program == "sidecar tail":
        proc = procs.start([str(SIDECAR), "tail", "jobs.>"], env, "tail")
    else:
        proc = procs.python(env, program.replace(" ", "-"), *PROGRAMS[program])
    peer = the_member(client, keys, proc, procs)
    if program == "own application":
        assert peer == "worker-7"
    wait_for(lambda: client.hlen(keys.subs), what="its subscription")  # inside its `async with`

    os.kill(proc.pid, sig)  # the process alone, as `docker stop` signals the container's init
    try:
        wait_for(lambda: client.zscore(keys.members, peer) is None, timeout=20,
                 what="the member record to go")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; exit status {proc.poll()}, log:\n{procs.log(proc)}") from None
    assert left_events(client, keys, peer) == ["leave"]  # left, not expired nor evicted
    assert not client.exists(keys.member(peer))
    proc.wait(timeout=20)
    log = procs.log(proc)
    # SIGTERM: a requested stop that went well. SIGINT: Python's KeyboardInterrupt, which an
    # application that does not catch it ends with (the demo and `sidecar tail` catch it)
    interrupted = sig == signal.SIGINT and program == "own application"
    assert proc.returncode == (-signal.SIGINT if interrupted else 0), log
    assert "Traceback" not in log or interrupted, log
