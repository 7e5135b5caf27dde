"""The Procfile, run with honcho as an operator runs it, pointed by environment at the test's own
Redis and free ports; docker-compose.yml's health checks, run as Docker would run them inside the
containers, fail before the processes start and pass against them."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest
import redis

from ops.embedded import free_port, redis_server_binary
from tests.deploy_files import PROCFILE, health_argv, services
from tests.support import ROOT, VENV_BIN, sidecar_env, wait_for

FLOWER_AUTH = "ops:flower-pa55word"
DASHBOARD_USER, DASHBOARD_PASSWORD = "ops", "dashboard-pa55word"


class Honcho:
    """``honcho start -f Procfile NAMES`` from the checkout, as an operator runs it (no ``.env``
    read); its output goes to a file. Leaving the block kills whatever it left running."""

    def __init__(self, names: list[str], env: dict[str, str], log: Path) -> None:
        self.names, self.env, self.log = names, env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "honcho"), "start", "--no-colour", "-e", os.devnull, "-f", str(PROCFILE),
                 *self.names], cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def pids(self) -> dict[str, int]:
        """Process name -> pid of the shell honcho started it in (the leader of its own group);
        honcho calls the first of each kind ``<name>.1``."""
        found = re.finditer(r"\| (\S+)\.1 started \(pid=(\d+)\)", self.output())
        return {m[1]: int(m[2]) for m in found}

    def running(self) -> bool:
        """True while honcho runs; fails the test with its output once it has stopped."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"honcho stopped (rc={self.proc.returncode}):\n{self.output()[-4000:]}")
        return True

    def stop(self) -> None:
        """SIGTERM honcho (as Ctrl-C or a service manager would) and wait until it is gone."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.proc is not None and self.proc.poll() is None:  # first as honcho stops them
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        for pid in self.pids().values():
            if group_alive(pid):
                os.killpg(pid, signal.SIGKILL)
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def honcho_env(base: dict[str, str], **extra: str) -> dict[str, str]:
    """The environment an operator gives honcho: ``base`` without anything of Flower's or Celery's
    from the outside, the venv first on PATH, output unbuffered, then ``extra``."""
    env = {k: v for k, v in base.items() if not k.startswith(("FLOWER_", "CELERY_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', os.defpath)}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def get_json(url: str, credentials: str) -> Any:
    auth = "Basic " + base64.b64encode(credentials.encode()).decode()
    request = urllib.request.Request(url, headers={"Authorization": auth})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def answer(url: str, credentials: str) -> Any:
    """The JSON at ``url``, or None while nothing answers there."""
    try:
        return get_json(url, credentials)
    except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
        return None


def run_health_checks(names: list[str], env: dict[str, str]) -> dict[str, tuple[int, str]]:
    """Each service's compose health check, run here at once (Docker runs it in the service's
    container, where the same variables name its Redis and ports): name -> (exit status, output)."""
    svcs = services()
    started = {name: subprocess.Popen(health_argv(svcs[name]), env=env, cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
               for name in names}
    try:
        outputs = {name: proc.communicate(timeout=60)[0] for name, proc in started.items()}
        return {name: (proc.returncode, outputs[name][-1500:]) for name, proc in started.items()}
    finally:
        for proc in started.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.mark.timeout(300)
def test_procfile_runs_under_honcho_and_the_compose_health_checks_pass_against_it(
        redis_url: str, namespace: str, tmp_path: Path) -> None:
    names = ["worker", "beat", "flower", "dashboard", "conductor", "follower"]
    flower_port, dashboard_port = free_port(), free_port()
    env = honcho_env(sidecar_env(redis_url, namespace),
                     FLOWER_PORT=str(flower_port), FLOWER_BASIC_AUTH=FLOWER_AUTH,
                     SIDECAR_DASHBOARD_PORT=str(dashboard_port), SIDECAR_DASHBOARD_USER=DASHBOARD_USER,
                     SIDECAR_DASHBOARD_PASSWORD=DASHBOARD_PASSWORD,
                     CELERY_BEAT_SCHEDULE=str(tmp_path / "beat-schedule"),
                     HOSTNAME=socket.gethostname())  # Docker sets it; the worker's check pings by it
    # nothing runs in this namespace or on these ports yet: every check must fail
    before = run_health_checks(names, env)
    passing = [name for name, (rc, _) in before.items() if rc == 0]
    assert not passing, f"health checks that pass with nothing running: {passing}"

    dashboard = f"http://127.0.0.1:{dashboard_port}/api/status"
    flower = f"http://127.0.0.1:{flower_port}/api/workers?refresh=1"  # asks the workers, not its cache
    node = f"router@{socket.gethostname()}"
    with Honcho(names, env, tmp_path / "honcho.log") as honcho:
        def roles() -> set[str]:
            honcho.running()
            status = answer(dashboard, f"{DASHBOARD_USER}:{DASHBOARD_PASSWORD}")
            return {m["role"] for m in status["members"]} if status else set()

        wait_for(lambda: {"conductor", "follower"} <= roles(), timeout=120, interval=0.2,
                 what="the dashboard to list the conductor and a follower")
        wait_for(lambda: honcho.running() and node in (answer(flower, FLOWER_AUTH) or {}),
                 timeout=120, interval=0.2, what=f"Flower to list worker {node}")
        with pytest.raises(urllib.error.HTTPError) as denied:  # credentials set: the API needs them
            get_json(dashboard, "ops:wrong")
        assert denied.value.code == 401
        denied.value.close()

        failing: dict[str, tuple[int, str]] = {}

        def all_pass() -> bool:
            honcho.running()
            failing.clear()
            failing.update((n, r) for n, r in run_health_checks(names, env).items() if r[0])
            return not failing

        try:
            wait_for(all_pass, timeout=120, interval=0.5, what="every health check to pass")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; still failing: {failing}") from None
        assert list(tmp_path.glob("beat-schedule*")), "beat ignored CELERY_BEAT_SCHEDULE"

        pids = honcho.pids()
        assert set(pids) == set(names)
        honcho.stop()
        wait_for(lambda: not any(group_alive(p) for p in pids.values()), timeout=30,
                 what="every process honcho started to exit")
        out = honcho.output()
        assert all(re.search(rf"\| {n}\.1 stopped \(rc=", out) for n in names), out[-4000:]


def test_procfile_redis_line_runs_a_private_redis_on_the_port_given(tmp_path: Path) -> None:
    port = free_port()
    env = honcho_env(dict(os.environ), REDIS_PORT=str(port))
    env["PATH"] = f"{Path(redis_server_binary()).parent}{os.pathsep}{env['PATH']}"  # a 6.2+ server
    with (Honcho(["redis"], env, tmp_path / "honcho.log") as honcho,
          redis.Redis(host="127.0.0.1", port=port, decode_responses=True, socket_timeout=5) as client):
        def ours() -> bool:  # answering, and honcho's child (not another server on the port)
            honcho.running()
            pids = honcho.pids()
            try:
                pid = int(client.info("server")["process_id"])
            except (redis.ConnectionError, redis.TimeoutError):
                return False
            return "redis" in pids and os.getpgid(pid) == pids["redis"]

        wait_for(ours, timeout=30, what=f"the Procfile's redis on port {port}")
        config = client.config_get("*")
        assert config["maxmemory-policy"] == "noeviction"
        assert config["bind"] == "127.0.0.1" and config["save"] == "" and config["appendonly"] == "no"
        pid = honcho.pids()["redis"]
        honcho.stop()
        wait_for(lambda: not group_alive(pid), timeout=30, what="redis-server to exit")
