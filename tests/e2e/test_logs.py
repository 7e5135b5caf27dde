"""Logging end to end: beat's periodic duties stay out of ``-l info`` while real changes show there,
and a hardened-mode run at debug level writes no secret into any log."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
from collections.abc import Iterator
from urllib.parse import unquote, urlsplit

import pytest
import redis

from coordinator.settings import Settings
from ops.embedded import RedisServer
from tests.e2e.helpers import holders, sidecar_cli, start_worker, wait_until_routing
from tests.support import ROOT, TEST_PEER_KEY, VENV_BIN, Processes, sidecar_env, wait_for
from workers.application import SidecarCelery
from workers.logs import periodic_tasks

PEER_SCRIPT = str(ROOT / "tests" / "e2e" / "logging_peer.py")
RECORD = re.compile(r"^\d{4}-\d\d-\d\dT[\d:.]+Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
"""The start of a line the sidecar's text format wrote (anything else is a banner or a print)."""
DASHBOARD_PASSWORD = "dashboard-pa55word-of-the-logging-test"


def records(text: str) -> list[str]:
    """The log records (text format) in ``text``."""
    return [line for line in text.splitlines() if RECORD.match(line)]


def ready_id(procs: Processes, proc: subprocess.Popen[bytes]) -> str:
    """The id a logging_peer.py process printed once it was in and its echo came back."""
    def printed() -> str | None:
        if proc.poll() is not None:
            raise AssertionError(f"peer exited with {proc.returncode}:\n{procs.log(proc)}")
        found = re.search(r"^ready (\S+)$", procs.log(proc), re.M)
        return found.group(1) if found else None
    return str(wait_for(printed, 60, interval=0.05, what="the peer to join and hear its echo"))


@pytest.fixture
def probe(redis_url: str, namespace: str) -> Iterator[SidecarCelery]:
    """A Celery app on the test namespace's broker, to ask the worker what it has run."""
    app = SidecarCelery("probe", sidecar_settings=Settings(redis_url=redis_url, namespace=namespace))
    try:
        yield app
    finally:
        app.close()


def runs(probe: SidecarCelery, worker: str) -> dict[str, int]:
    """Tasks the worker has accepted so far, by name (its ``inspect stats`` totals)."""
    stats = probe.control.inspect(destination=[worker], timeout=1.0).stats() or {}
    return {str(k): int(v) for k, v in (stats.get(worker, {}).get("total") or {}).items()}


# ---------------------------------------------------------------------------------------- -l info


@pytest.mark.timeout(240)
def test_at_info_the_periodic_duties_say_nothing_until_something_changes(
        procs: Processes, redis_url: str, namespace: str, client: redis.Redis,
        probe: SidecarCelery) -> None:
    env = sidecar_env(redis_url, namespace, heartbeat_interval=0.25, member_ttl=1.0)
    worker = start_worker(procs, env, client, "w1")  # -l info, as the README says
    beat = procs.beat(env)                           # -l info
    name = f"w1@{socket.gethostname()}"
    duties = periodic_tasks(Settings.from_env(env))
    frequent = ("sidecar.sweep", "sidecar.elect", "sidecar.cluster_heartbeat",
                "sidecar.distribute_policies", "sidecar.watch_inboxes")

    def ran_at_least(floor: dict[str, int]) -> dict[str, int] | None:
        done = runs(probe, name)
        return done if all(done.get(t, 0) >= floor.get(t, 0) for t in frequent) else None

    first = wait_for(lambda: ran_at_least(dict.fromkeys(frequent, 5)), 90, interval=0.2,
                     what="beat's duties to run five times each")
    worker_lines, beat_lines = len(records(procs.log(worker))), len(records(procs.log(beat)))
    later = wait_for(lambda: ran_at_least({t: n + 10 for t, n in first.items()}), 90, interval=0.2,
                     what="ten more runs of each duty")
    assert all(later[t] >= first[t] + 10 for t in frequent)
    # ten more runs of five duties, and not one more line at info, in the worker or in beat
    assert records(procs.log(worker))[worker_lines:] == []
    assert records(procs.log(beat))[beat_lines:] == []

    # real changes are news: a peer joins and leads, is killed and evicted, the lead moves; the
    # other one leaves, and the cluster has no leader
    p1 = procs.python(env, "p1", PEER_SCRIPT)
    p1_id = ready_id(procs, p1)
    wait_for(lambda: f"leader is now {p1_id}" in procs.log(worker), 30, what="p1 elected")
    p2 = procs.python(env, "p2", PEER_SCRIPT)
    p2_id = ready_id(procs, p2)
    procs.kill(p1)  # SIGKILL: no leave, the sweep evicts it
    wait_for(lambda: f"leader is now {p2_id}" in procs.log(worker), 30, what="the lead to move to p2")
    procs.kill(p2, signal.SIGTERM)  # leaves cleanly
    wait_for(lambda: "no leader:" in procs.log(worker), 30, what="the cluster to be without a leader")

    lines = records(procs.log(worker))
    news = {
        "p1 joined": f"{p1_id} joined",
        "p1 evicted": f"evicted {p1_id}: silent",
        "p2 leads": f"leader is now {p2_id}",
        "p2 left": f"{p2_id} left (it was the leader)",
        "no leader": f"no leader: {p2_id} is gone",
    }
    for what, text in news.items():
        found = [line for line in lines if text in line]
        assert found, f"{what}: no line with {text!r} in\n" + "\n".join(lines)
        assert " INFO " in found[0], found
    # and through all of it, not one line about a single run of a periodic duty
    for log in (procs.log(worker), procs.log(beat)):
        per_run = [line for line in records(log) if any(d in line for d in duties)]
        assert per_run == [], per_run


# ---------------------------------------------------------------------------------------- secrets


def env_lines(out: str) -> dict[str, str]:
    """``KEY=VALUE`` lines of a ``sidecar`` command's output."""
    return dict(line.split("=", 1) for line in out.strip().splitlines() if "=" in line)


@pytest.mark.timeout(240)
def test_a_hardened_run_at_debug_level_logs_no_secret(procs: Processes, fresh_redis: RedisServer,
                                                      namespace: str) -> None:
    # hardened mode: the sidecar's own Redis user (default user off), signed requests, and a peer
    # with an identity and a Redis user of its own
    first = sidecar_env(fresh_redis.url, namespace, auth="required")
    sidecar_url = env_lines(sidecar_cli(first, "harden"))["SIDECAR_REDIS_URL"]
    sidecar_password = urlsplit(sidecar_url).password or ""
    env = sidecar_env(sidecar_url, namespace, auth="required", log_level="debug",
                      dashboard_user="admin", dashboard_password=DASHBOARD_PASSWORD)
    creds = env_lines(sidecar_cli(env, "peer", "add", "logger", "--role", "app", "--redis-acl"))
    peer_id, peer_secret = creds["SIDECAR_PEER_ID"], creds["SIDECAR_PEER_SECRET"]
    peer_password = creds["SIDECAR_REDIS_PASSWORD"]
    peer_url = f"redis://{creds['SIDECAR_REDIS_USER']}:{peer_password}@127.0.0.1:{fresh_redis.port}/0"
    secrets = {"peer secret": peer_secret, "peer key": TEST_PEER_KEY, "dashboard": DASHBOARD_PASSWORD,
               "sidecar's Redis password": unquote(sidecar_password),
               "peer's Redis password": peer_password}
    assert all(len(s) >= 8 for s in secrets.values()), "a secret too short to grep for"

    admin = redis.Redis.from_url(sidecar_url, decode_responses=True)
    try:
        # worker and beat without -l: SIDECAR_LOG_LEVEL=debug sets their level; beat logs JSON
        celery = str(VENV_BIN / "celery")
        worker = procs.start([celery, "-A", "workers", "worker", "-n", "w1@%h", "-P", "solo",
                              "--without-mingle", "--without-gossip"], env, "worker")
        wait_until_routing(procs, {"worker": worker}, lambda: holders(admin, namespace)[0] == "w1",
                           what="the worker to route")
        beat = procs.start([celery, "-A", "workers", "beat", "-s", str(procs.dir / "schedule")],
                           {**env, "SIDECAR_LOG_FORMAT": "json"}, "beat")
        peer_env = {k: v for k, v in env.items() if k != "SIDECAR_PEER_KEY"}  # a peer never holds it
        peer_env.update(SIDECAR_REDIS_URL=peer_url, SIDECAR_PEER_ID=peer_id, SIDECAR_PEER_SECRET=peer_secret)
        peer = procs.python(peer_env, "peer", PEER_SCRIPT)
        assert ready_id(procs, peer) == peer_id
        cli = subprocess.run([str(VENV_BIN / "sidecar"), "peers"], env=env, capture_output=True,
                             text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        procs.kill(peer, signal.SIGTERM)  # leaves
        wait_for(lambda: f"{peer_id} left" in procs.log(worker), 30, what="the peer's leave logged")
        wait_for(lambda: '"level": "debug"' in procs.log(beat), 30, what="beat's debug records")
        for proc in (worker, beat):
            procs.kill(proc, signal.SIGTERM)
    finally:
        admin.close()

    logs = {"worker": procs.log(worker), "beat": procs.log(beat), "peer": procs.log(peer),
            "cli": cli.stdout + cli.stderr}
    # the logs are what they should be: at debug level, naming the peer ...
    assert any(" DEBUG " in line for line in records(logs["worker"]))
    assert any(f"{peer_id} joined" in line for line in records(logs["worker"]))
    beat_records = [json.loads(line) for line in logs["beat"].splitlines() if line.startswith("{")]
    assert {r["level"] for r in beat_records} >= {"debug", "info"}
    assert {r["component"] for r in beat_records} >= {"beat"}
    peer_records = records(logs["peer"])
    assert any(f"peer_id={peer_id}" in line and " DEBUG mixin " in line for line in peer_records), \
        "\n".join(peer_records)
    assert peer_id in logs["cli"]
    # ... and hold no secret, in a record, a banner or anything else a process printed
    for process, text in logs.items():
        for what, secret in secrets.items():
            assert secret not in text, f"the {what} is in the {process}'s log"
