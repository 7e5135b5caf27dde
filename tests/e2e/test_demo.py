"""`sidecar up` with no SIDECAR_REDIS_URL: embedded Redis, worker, beat and three demo peers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support import VENV_BIN, Processes, wait_for


def _related(pid: int, markers: tuple[str, ...]) -> str | None:
    """The command line of ``pid`` if its command line, environment or working directory mentions one
    of ``markers``."""
    proc = Path("/proc") / str(pid)
    try:
        cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        environ = (proc / "environ").read_bytes().decode(errors="replace")
        cwd = os.readlink(proc / "cwd")
    except OSError:  # gone meanwhile, or not ours to read
        return None
    # redis-server rewrites its command line ("redis-server 127.0.0.1:<port>"), but runs in its dir
    text = "\0".join((cmdline, environ, cwd))
    return cmdline if any(m in text for m in markers) else None


def leftovers(markers: tuple[str, ...]) -> dict[int, str]:
    """Live processes (not this one) that belong to the run identified by ``markers``."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            cmdline = _related(int(entry.name), markers)
            if cmdline:  # zombies have an empty command line: they are gone, only unreaped
                out[int(entry.name)] = cmdline
    return out


def assert_nothing_left(out: str) -> tuple[str, str, Path]:
    """Find the run's Redis servers (and NATS) and log folder in its output; fail if any of its
    processes lives on.

    Returns (the first embedded Redis URL, its port, the folder of the children's logs).
    """
    servers = re.findall(r"embedded (?:Redis|NATS)[^\n]* on (\S+) \(log: (\S+)\)", out)
    redis_line = re.search(r"embedded Redis (?:for site \S+ )?on (redis://127\.0\.0\.1:(\d+)/0)", out)
    logs_line = re.search(r"logs in (\S+)", out)
    assert servers and redis_line and logs_line, out
    url = redis_line.group(1)
    markers = (*(f"_URL={u}" for u, _ in servers), *(str(Path(log).parent) for _, log in servers),
               logs_line.group(1))
    left = leftovers(markers)
    for pid in left:  # clean up before failing, so nothing outlives the test
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of `sidecar up` still alive: {left}"
    return url, redis_line.group(2), Path(logs_line.group(1))


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_sidecar_up_runs_the_demo_and_leaves_nothing_behind(procs: Processes) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env["PYTHONUNBUFFERED"] = "1"
    up = procs.start([str(VENV_BIN / "sidecar"), "up", "--duration", "6", "--no-flower"], env, "up")
    try:
        code = up.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`sidecar up --duration 6` still running after 60s:\n{procs.log(up)}")
    out = procs.log(up)

    url, port, logs_dir = assert_nothing_left(out)
    assert code == 0, out
    status = [dict(re.findall(r"(\w+)=(\S+)", line)) for line in out.splitlines()
              if line.startswith("peers=")]
    assert status, out
    assert any(s["peers"] == "3" for s in status), out          # conductor and two followers
    assert max(int(s["routed"]) for s in status) > 0, out      # conductor.heartbeat was routed
    assert max(int(s["delivered"]) for s in status) > 0, out   # ...and reached the followers
    assert any(s["leader"] != "none" for s in status), out     # beat elected a leader
    assert all(s["rejected"] == "0" for s in status), out
    assert "settings:" in out and f":{port}" in url
    steps = [line.rsplit(" (", 1)[0] for line in out.splitlines() if line.startswith("ready: ")]
    assert steps == ["ready: workers route (partition leases held)",
                     "ready: beats keep the periodic duties (beat lease held)",
                     "ready: demo peers joined", "ready: a leader elected"], out
    # the worker, beat and peers wrote their logs where `sidecar up` said
    logs = {p.name for p in logs_dir.iterdir()}
    assert {"worker.log", "beat.log", "conductor.log", "follower-1.log", "follower-2.log"} <= logs


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_ctrl_c_stops_sidecar_up_and_every_child(procs: Processes) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env["PYTHONUNBUFFERED"] = "1"
    up = procs.start([str(VENV_BIN / "sidecar"), "up", "--no-flower"], env, "up")
    wait_for(lambda: up.poll() is not None or "peers=3" in procs.log(up), timeout=45,
             what="`sidecar up` to report three peers")
    assert up.poll() is None, procs.log(up)
    os.killpg(up.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    try:
        up.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`sidecar up` ignored Ctrl-C for 30s:\n{procs.log(up)}")
    out = procs.log(up)
    _, _, logs_dir = assert_nothing_left(out)
    # Regression (fixed) (coordinator/embedded.py EmbeddedServer.start): redis-server was started in
    # `sidecar up`'s own process group, so Ctrl-C kills Redis before the peers are asked to stop.
    # The conductor then hangs in cluster_publish (the link retries the write forever) until the
    # supervisor SIGKILLs it after 10s, and the followers die with a ConnectionError traceback from
    # publish_heartbeat: the orderly "peers first, so they leave cleanly" shutdown never happens.
    assert "did not stop" not in out, out
    for name in ("conductor", "follower-1", "follower-2"):
        log = (logs_dir / f"{name}.log").read_text(errors="replace")
        assert "Traceback" not in log, f"{name}:\n{log[-3000:]}"
        # each peer left while the worker still routed (its leave was answered): peers stop first
        assert "leave not confirmed" not in log, f"{name}:\n{log[-3000:]}"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sidecar_up_with_two_sites_federates_them_and_leaves_nothing_behind(procs: Processes) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env["PYTHONUNBUFFERED"] = "1"
    up = procs.start([str(VENV_BIN / "sidecar"), "up", "--sites", "2", "--duration", "10",
                      "--no-flower"], env, "up")
    try:
        code = up.wait(90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`sidecar up --sites 2` still running after 90s:\n{procs.log(up)}")
    out = procs.log(up)
    _, _, logs_dir = assert_nothing_left(out)
    assert code == 0, out
    assert "embedded NATS with JetStream" in out, out
    status = [(line.split(":", 1)[0], dict(re.findall(r"(\w+)=(\S+)", line)))
              for line in out.splitlines() if re.match(r"site\d: peers=", line)]
    last = {site: s for site, s in status}
    assert set(last) == {"site1", "site2"}, out
    assert all(s["sites"] == "2/2" for s in last.values()), out  # each site hears both
    # one leader for the whole namespace, the same on both sites
    assert last["site1"]["leader"] == last["site2"]["leader"] != "none", out
    follower = (logs_dir / "follower-site2.log").read_text(errors="replace")
    assert "Traceback" not in follower, follower[-3000:]
    # the conductor's heartbeats (site 1) reach the follower on site 2 through the bridges
    assert "following the conductor at tempo" in follower and "(from site site1)" in follower, follower
    assert int(last["site2"]["routed"]) > 0, out


@pytest.mark.timeout(120)
def test_sidecar_up_serves_the_dashboard_and_a_second_up_on_the_namespace_says_one_runs(
        procs: Processes, redis_server: Any, namespace: str) -> None:
    import json
    import urllib.error
    import urllib.request

    from tests.support import sidecar_env

    env = sidecar_env(redis_server.url, namespace)  # a Redis this run did not start
    first = procs.start([str(VENV_BIN / "sidecar"), "up", "--no-demo", "--dashboard",
                         "--duration", "60"], env, "up1")
    found = wait_for(lambda: re.search(r"dashboard on (http://\S+/)", procs.log(first)), 30,
                     what="the dashboard's address")
    base = found.group(1)

    def status() -> Any:
        try:
            with urllib.request.urlopen(base + "api/status", timeout=5) as resp:
                return json.load(resp)
        except (urllib.error.URLError, ConnectionError):
            return None

    assert wait_for(status, 30, what="the dashboard answering")["namespace"] == namespace
    # progress while starting: each step once, in order, then the total; no demo step with --no-demo
    wait_for(lambda: "everything started in" in procs.log(first), 30, what="the start to complete")
    steps = [line.rsplit(" (", 1)[0] for line in procs.log(first).splitlines() if line.startswith("ready: ")]
    assert steps == ["ready: workers route (partition leases held)",
                     "ready: beats keep the periodic duties (beat lease held)",
                     "ready: the dashboard answers"], procs.log(first)
    second = subprocess.run([str(VENV_BIN / "sidecar"), "up", "--no-peers", "--duration", "5"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode != 0
    assert "already runs on namespace" in second.stderr and "Traceback" not in second.stderr
    procs.kill(first, signal.SIGINT)
    assert first.returncode == 0, procs.log(first)


def test_structured_logs_are_one_json_object_per_line(procs: Processes, redis_url: str,
                                                     namespace: str, client: Any) -> None:
    import json

    from tests.e2e.helpers import start_worker
    from tests.support import sidecar_env

    env = sidecar_env(redis_url, namespace, log_format="json")
    worker = start_worker(procs, env, client, "w1")
    records = []

    def router_logged() -> bool:
        records.clear()
        for line in procs.log(worker).splitlines():
            if line.startswith("{"):
                records.append(json.loads(line))
        return any(r["logger"] == "sidecar.router" for r in records)

    wait_for(router_logged, 20, what="a JSON line from the router")
    fields = {"time", "level", "component", "namespace", "site", "peer_id", "worker", "logger", "message"}
    assert all(fields <= set(r) for r in records)
    assert {(r["namespace"], r["worker"]) for r in records} == {(namespace, records[0]["worker"])}
    assert records[0]["worker"].startswith("w1@")
    text_records = [line for line in procs.log(worker).splitlines()
                    if re.match(r"^\d{4}-\d\d-\d\dT[\d:.]+Z (INFO|WARNING|ERROR) ", line)
                    or re.match(r"^\[\d{4}-\d\d-\d\d [\d:,]+: (INFO|WARNING|ERROR)/", line)]
    assert not text_records, text_records  # every log record is JSON (the banner is not a record)


@pytest.mark.timeout(90)
def test_sidecar_up_on_a_terminal_draws_a_live_view() -> None:
    import pty
    import select

    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env.update(PYTHONUNBUFFERED="1", COLUMNS="160", LINES="50", TERM="xterm")
    sidecar = str(VENV_BIN / "sidecar")
    pid, fd = pty.fork()
    if pid == 0:  # the child: `sidecar up` with a terminal for its stdout
        os.execve(sidecar, [sidecar, "up", "--duration", "6"], env)
    out = b""
    while True:
        ready, _, _ = select.select([fd], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode(errors="replace"))
    assert os.waitstatus_to_exitcode(status) == 0, text[-3000:]
    assert "sidecar up · namespace" in text and "routed/s" in text, text[-3000:]
    assert "★" in text, text[-3000:]  # the demo's leader, marked in the peers table
    assert_nothing_left(text)
