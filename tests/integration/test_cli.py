"""The click CLI against a real Redis with an in-process router: read commands, publish, tail."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from coordinator.settings import Settings
from coordinator.sidecar import ClusterSidecar
from coordinator.status import StatusField
from mixin import Agent, Message, SidecarMixin
from ops.cli import cli
from tests.support import TEST_PEER_KEY, VENV_BIN, Peer, wait_for


@pytest.fixture
def sidecar(settings: Settings) -> Iterator[ClusterSidecar]:
    sc = ClusterSidecar(settings=settings)
    sc.start()
    try:
        yield sc
    finally:
        sc.stop()


def run(settings: Settings, *args: str) -> str:
    env = {"SIDECAR_REDIS_URL": settings.redis_url or "", "SIDECAR_NAMESPACE": settings.namespace,
           "SIDECAR_PEER_KEY": TEST_PEER_KEY}
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


class Metronome(Agent, SidecarMixin):
    """A peer with a status field of its own, as the seed's examples have."""

    tempo = StatusField(120)


def test_read_commands_report_the_cluster(settings: Settings, sidecar: ClusterSidecar) -> None:
    async def scenario() -> str:
        async with Metronome(namespace=settings.namespace, settings=settings, role="tester",
                             labels={"zone": "a"}) as peer:
            await peer.cluster_subscribe("a.>", lambda m: None)
            peer.tempo = 96
            await peer.publish_heartbeat({"load": 0.5})
            status = json.loads(run(settings, "status", "--json"))
            assert status["cluster_size"] == 1
            assert status["active_subscriptions"] == 1  # what it subscribed, not its bookkeeping
            assert status["data_path"] == "direct"  # unsigned, not enforced: no router hop
            assert [m["id"] for m in status["members"]] == [peer.id]
            peers = json.loads(run(settings, "peers", "--json"))
            (row,) = peers
            assert (row["role"], row["name"], row["labels"]) == ("tester", "Metronome", {"zone": "a"})
            assert row["status"]["tempo"] == 96 and row["status"]["sidecar_connected"] is True
            assert row["extra"] == {"load": 0.5}
            assert row["policy_state"] == "NONE"  # no policy set: nothing to be stale against
            assert row["inbox_length"] >= 0 and row["inbox_drops"] == 0
            text = run(settings, "peers")
            assert "Metronome" in text and '"tempo":96' in text and "policy=NONE" in text
            subs = json.loads(run(settings, "subscriptions", "--json"))
            assert [(r["pattern"], r["peer"]) for r in subs] == [("a.>", peer.id)]
            return peer.id

    peer_id = asyncio.run(scenario())
    events = json.loads(run(settings, "events", "--json"))
    assert [e["event"] for e in events][:2] == ["joined", "left"], events
    assert all(e["peer"] == peer_id and isinstance(e["at_ms"], int) for e in events[:2])
    leader = json.loads(run(settings, "leader", "--json"))
    assert set(leader) == {"leader_id", "leader_term", "history"}
    assert all(isinstance(h["leader_term"], int) for h in leader["history"])


def test_publish_reaches_a_subscriber(settings: Settings, sidecar: ClusterSidecar) -> None:
    got: list[Message] = []
    ready = threading.Event()
    done = threading.Event()

    async def subscriber() -> None:
        async with Peer(namespace=settings.namespace, settings=settings) as peer:
            await peer.cluster_subscribe("conductor.set_tempo", got.append)
            ready.set()
            while not got:
                await asyncio.sleep(0.01)
        done.set()

    thread = threading.Thread(target=asyncio.run, args=(subscriber(),))
    thread.start()
    assert ready.wait(20)
    out = run(settings, "publish", "conductor.set_tempo", '{"tempo": 90}')
    assert out.startswith("published to conductor.set_tempo: message id ")
    thread.join(20)
    assert done.is_set()
    assert got[0].data == {"tempo": 90}


def test_publish_refuses_bad_json_and_wildcards(settings: Settings, sidecar: ClusterSidecar) -> None:
    env = {"SIDECAR_REDIS_URL": settings.redis_url or "", "SIDECAR_NAMESPACE": settings.namespace,
           "SIDECAR_PEER_KEY": TEST_PEER_KEY}
    bad = CliRunner().invoke(cli, ["publish", "a.b", "{nope"], env=env)
    assert bad.exit_code != 0 and "must be JSON" in bad.output
    wildcard = CliRunner().invoke(cli, ["publish", "a.*", "1"], env=env)
    assert wildcard.exit_code != 0 and "wildcard" in wildcard.output


def test_doctor_reports_redis_and_timings(settings: Settings) -> None:
    data = json.loads(run(settings, "doctor", "--json"))
    levels = {c["name"]: c["level"] for c in data["checks"]}
    assert levels["redis_version"] == "ok"
    assert levels["maxmemory_policy"] == "ok"
    assert data["timings"]["member_ttl_s"] == settings.member_ttl
    assert data["settings"]["peer_key"] == "***"  # set by run(), and never printed
    assert TEST_PEER_KEY not in json.dumps(data)


def test_read_command_without_redis_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["status"], env={"SIDECAR_REDIS_URL": ""})
    assert result.exit_code == 2
    assert "SIDECAR_REDIS_URL" in result.output


def test_tail_prints_json_lines(settings: Settings, sidecar: ClusterSidecar, client: redis.Redis) -> None:
    env = {**os.environ, "SIDECAR_REDIS_URL": settings.redis_url or "",
           "SIDECAR_NAMESPACE": settings.namespace}
    tail = subprocess.Popen([str(VENV_BIN / "sidecar"), "tail", "x.>", "--count", "2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: any(f.endswith(" x.>") for f in client.hkeys(sidecar.keys.subs)), 20,
                 what="tail's subscription")
        run(settings, "publish", "x.one", "1")
        run(settings, "publish", "x.two", '"two"')
        out, err = tail.communicate(timeout=30)
    finally:
        tail.kill()
    assert tail.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(m["topic"], m["data"]) for m in lines] == [("x.one", 1), ("x.two", "two")]


def test_peer_add_records_labels_priority_and_eligibility(settings: Settings, client: redis.Redis) -> None:
    from coordinator.keys import Keys
    from coordinator.policy.auth import Identities

    out = run(settings, "peer", "add", "edge", "--role", "player", "--label", "zone=eu",
              "--label", "tier=gold", "--priority", "7", "--no-leader")
    peer_id = next(line.split("=", 1)[1] for line in out.splitlines()
                   if line.startswith("SIDECAR_PEER_ID="))
    ident = Identities(client, Keys(settings.namespace), TEST_PEER_KEY).load()[peer_id]
    assert (dict(ident.labels), ident.priority, ident.eligible) == ({"zone": "eu", "tier": "gold"}, 7,
                                                                     False)
    env = {"SIDECAR_REDIS_URL": settings.redis_url or "", "SIDECAR_NAMESPACE": settings.namespace,
           "SIDECAR_PEER_KEY": TEST_PEER_KEY}
    bad = CliRunner().invoke(cli, ["peer", "add", "x", "--role", "r", "--label", "novalue"], env=env)
    assert bad.exit_code == 2 and "KEY=VALUE" in bad.output


def test_doctor_in_hardened_mode_and_harden(fresh_redis: Any, namespace: str) -> None:
    from coordinator.policy.auth import acl_user

    def sidecar(url: str, *args: str) -> Any:
        env = {"SIDECAR_REDIS_URL": url, "SIDECAR_NAMESPACE": namespace, "SIDECAR_AUTH": "required",
               "SIDECAR_PEER_KEY": TEST_PEER_KEY}
        return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)

    def levels(url: str) -> tuple[int, dict[str, tuple[str, str]]]:
        result = sidecar(url, "doctor", "--json")
        data = json.loads(result.stdout)
        return result.exit_code, {c["name"]: (c["level"], c["detail"]) for c in data["checks"]}

    url = fresh_redis.url
    added = dict(line.split("=", 1) for line in sidecar(url, "peer", "add", "alice", "--role", "p",
                                                         "--redis-acl").stdout.split())
    peer = added["SIDECAR_PEER_ID"]
    code, found = levels(url)
    assert code == 1 and found["default_user"][0] == "fail" and "sidecar harden" in found["default_user"][1]
    assert found["peer_key"][0] == "ok" and found[f"peer_user {peer}"][0] == "ok"
    admin = redis.Redis.from_url(url, decode_responses=True)
    admin.acl_setuser(acl_user(peer), keys=["~*"], commands=["+get"])  # an administrator's slip
    admin.close()
    code, found = levels(url)
    level, detail = found[f"peer_user {peer}"]
    assert level == "fail" and "key pattern ~*" in detail and "command +get" in detail

    hardened = sidecar(url, "harden")
    assert hardened.exit_code == 0, hardened.output
    own_url = hardened.stdout.strip().removeprefix("SIDECAR_REDIS_URL=")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(url).ping()  # the open door is shut
    assert sidecar(own_url, "peer", "rotate", "alice", "--redis-acl").exit_code == 0
    code, found = levels(own_url)
    assert code == 0, found
    assert found["default_user"][0] == "ok" and found[f"peer_user {peer}"][0] == "ok"


def test_subscriptions_inbox_and_events(settings: Settings, sidecar: ClusterSidecar) -> None:
    async def scenario() -> str:
        async with Peer(namespace=settings.namespace, settings=settings) as peer:
            await peer.cluster_subscribe("a.>", lambda m: None)
            await peer.cluster_subscribe("jobs.*", lambda m: None, queue="workers")
            subs = json.loads(run(settings, "subscriptions", "--json"))
            assert {(s["pattern"], s["queue"], s["peer"]) for s in subs} >= {
                ("a.>", None, peer.id), ("jobs.*", "workers", peer.id)}
            text = run(settings, "subscriptions")
            assert "jobs.*" in text and "queue workers" in text
            report = json.loads(run(settings, "inbox", peer.id, "--json"))
            assert report["member"] is True and report["drops"] == 0
            assert set(report) == {"peer", "member", "length", "pending", "lag", "oldest_s", "drops"}
            return peer.id

    peer_id = asyncio.run(scenario())
    events = json.loads(run(settings, "events", "--json", "--count", "10"))
    assert [e["event"] for e in events if e.get("peer") == peer_id] == ["joined", "left"]
    env = {"SIDECAR_REDIS_URL": settings.redis_url or "", "SIDECAR_NAMESPACE": settings.namespace}
    unknown = CliRunner().invoke(cli, ["inbox", "01NOSUCHPEER"], env=env)
    assert unknown.exit_code == 1 and "`sidecar peers` lists the members" in unknown.output


def test_redis_out_of_reach_is_one_line_with_the_fix() -> None:
    from ops.embedded import free_port

    env = {**os.environ, "SIDECAR_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    done = subprocess.run([str(VENV_BIN / "sidecar"), "status"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1
    assert "cannot reach Redis" in done.stderr and "SIDECAR_REDIS_URL" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_workers_names_the_lease_holders_and_fails_while_nothing_routes(settings: Settings) -> None:
    env = {"SIDECAR_REDIS_URL": settings.redis_url or "", "SIDECAR_NAMESPACE": settings.namespace}
    idle = CliRunner().invoke(cli, ["workers"], env=env)
    assert idle.exit_code == 1 and "partition 0: NONE" in idle.output and "beat: NONE" in idle.output
    sc = ClusterSidecar(settings=settings, name="r-under-test")  # routes, and runs the duties
    sc.start()
    try:
        def healthy() -> Any:
            result = CliRunner().invoke(cli, ["workers", "--json"], env=env)
            return result.exit_code == 0 and json.loads(result.output)

        report = wait_for(healthy, what="a router and a duty loop holding their leases")
        assert report["routers"][0]["name"] == "r-under-test"
        assert report["routers"][0]["partitions"] == list(range(settings.partitions))
        assert report["beat"]["name"] and report["beat"]["pid"] == os.getpid()
    finally:
        sc.stop()


def test_dashboard_settings_come_from_the_environment_and_bad_ones_are_one_line(
        settings: Settings) -> None:
    env = {"SIDECAR_REDIS_URL": settings.redis_url or "", "SIDECAR_NAMESPACE": settings.namespace,
           "SIDECAR_DASHBOARD_HOST": "0.0.0.0"}
    open_wide = CliRunner().invoke(cli, ["dashboard"], env=env)
    assert open_wide.exit_code == 2 and "only with credentials" in open_wide.output
    bad_port = CliRunner().invoke(cli, ["dashboard"], env={**env, "SIDECAR_DASHBOARD_PORT": "70000"})
    assert bad_port.exit_code == 2 and "dashboard_port must be 0-65535" in bad_port.output
    with socket.socket() as taken:  # a port in use: one line, not a traceback
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = CliRunner().invoke(cli, ["dashboard", "--host", "127.0.0.1", "--port",
                                        str(taken.getsockname()[1])], env=env)
    assert busy.exit_code == 2 and "Traceback" not in busy.output and "in use" in busy.output


def test_what_peers_chose_reaches_the_terminal_without_control_characters(
        settings: Settings, client: redis.Redis) -> None:
    from coordinator.cluster.membership import Membership
    from coordinator.keys import Keys

    Membership(client, Keys(settings.namespace)).register(
        "01ESCAPE000000000000000000", role="x\nFAKE-PEER leader", labels={"zone": "\x1b[2Jgone"})
    text = run(settings, "peers")
    assert "\x1b" not in text and "\nFAKE-PEER" not in text
    assert "\\x1b[2Jgone" in text and "x\\nFAKE-PEER" in text


def test_running_the_cli_in_a_process_leaves_its_logging_alone(settings: Settings) -> None:
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    run(settings, "status", "--json")
    assert (list(root.handlers), root.level) == before  # only the `sidecar` program sets it up
