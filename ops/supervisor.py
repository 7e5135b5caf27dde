"""``sidecar up``: run a whole sidecar (and demo peers) as child processes of one command.

Starts an embedded Redis when no ``SIDECAR_REDIS_URL`` is set, then a worker (hosting the router),
beat, optionally Flower and the dashboard on loopback, and the demo peers; reports each step of
the start as it completes (:class:`Startup`) and the cluster status each second; on
Ctrl-C, SIGTERM or the end of ``duration`` stops every child (peers first, so they leave cleanly)
and makes sure none is left behind.

With ``sites`` above one it runs a federated cluster on this machine: an embedded NATS server with
JetStream (unless ``SIDECAR_NATS_URL`` names one), and per site its own embedded Redis, worker
(router and NATS bridge), beat and demo peers (the conductor on the first site, a follower on
every site), with one status line per site.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from coordinator.keys import Keys
from coordinator.policy.store import PolicyStore
from coordinator.settings import Settings
from ops.embedded import NatsServer, RedisServer, free_port
from ops.live import LiveView
from ops.report import cluster_report, members_report, sites_report

__all__ = ["Startup", "Supervisor"]

Check = Callable[[dict[str, redis.Redis], Keys], bool]


class Startup:
    """What ``sidecar up`` waits to see after starting its children, checked on each tick: each
    step is reported once, with the seconds it took, so an operator sees what started and what
    it is still waiting for (on a terminal the live view lists the steps as they complete)."""

    def __init__(self, steps: list[tuple[str, Check]]) -> None:
        self.steps = steps
        self.began = time.monotonic()
        self.done: dict[str, float] = {}
        """Step -> seconds after the start it was first seen done."""

    @property
    def pending(self) -> list[str]:
        return [name for name, _ in self.steps if name not in self.done]

    def check(self, clients: dict[str, redis.Redis], keys: Keys) -> list[str]:
        """Check the pending steps; returns the lines for those done now (in order)."""
        lines = []
        for name, check in self.steps:
            if name in self.done:
                continue
            try:
                ok = check(clients, keys)
            except (redis.RedisError, OSError):
                ok = False
            if not ok:
                break  # later steps build on this one: report them in order
            self.done[name] = time.monotonic() - self.began
            lines.append(f"ready: {name} ({self.done[name]:.1f}s)")
        if lines and not self.pending:
            lines.append(f"everything started in {max(self.done.values()):.1f}s")
        return lines

    def lines(self) -> list[str]:
        """Every step, done (with its time) or still awaited, for the live view."""
        return [f"✓ {name} ({self.done[name]:.1f}s)" if name in self.done else f"… {name}"
                for name, _ in self.steps]


def _web_check(url: str, clients: dict[str, redis.Redis], keys: Keys) -> bool:
    """A startup step's check: whether the web UI at ``url`` answers at all (even 401: it is up;
    the dashboard's /healthz answers 200 only once it reads Redis)."""
    try:
        with urllib.request.urlopen(url, timeout=0.5):
            return True
    except urllib.error.HTTPError as exc:
        return exc.code != 503
    except (urllib.error.URLError, OSError):
        return False


class Supervisor:
    """Owns the child processes of ``sidecar up``."""

    def __init__(self, settings: Settings, *, peers: bool = True, flower: bool = False,
                 dashboard: bool = False, sites: int = 1, live: bool = False,
                 echo: Callable[[str], None] = print) -> None:
        if sites < 1:
            raise ValueError("sites must be at least 1")
        if sites > 1 and settings.redis_url:
            raise ValueError("with more than one site, `sidecar up` starts a Redis per site: "
                             "unset SIDECAR_REDIS_URL")
        self.settings = settings
        self.sites = sites
        self.with_peers = peers
        self.with_flower = flower
        self.with_dashboard = dashboard
        self.live = live
        """Draw a live view in the terminal (rich) instead of a status line each second."""
        self._claim: tuple[redis.Redis, str] | None = None
        """The namespace's ``up`` key and this run's token in it (an external Redis only)."""
        self.echo = echo
        self.servers: list[RedisServer] = []
        self.nats: NatsServer | None = None
        self.urls: dict[str, str] = {}
        """Site name -> its Redis URL."""
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.dir = Path(tempfile.mkdtemp(prefix="sidecar-up-"))
        self.web: dict[str, str] = {}
        """Startup step -> the URL of a web UI it started (Flower, the dashboard)."""
        self._stopping = False

    def _env(self, url: str, site: str | None = None, nats_url: str | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["SIDECAR_REDIS_URL"] = url
        env["SIDECAR_NAMESPACE"] = self.settings.namespace
        env["PYTHONUNBUFFERED"] = "1"
        if site is not None:
            env["SIDECAR_SITE"] = site
        if nats_url:
            env["SIDECAR_NATS_URL"] = nats_url
        return env

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        log = self.dir / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.children.append((name, proc))

    def start(self) -> str:
        """Start everything; returns the (first site's) Redis URL in use."""
        nats_url = self.settings.nats_url
        if self.sites > 1 and not nats_url:
            self.nats = NatsServer().start()
            nats_url = self.nats.url
            self.echo(f"embedded NATS with JetStream on {nats_url} (log: {self.nats.log_path})")
        names = ([self.settings.site or "local"] if self.sites == 1
                 else [f"site{i + 1}" for i in range(self.sites)])
        if self.settings.redis_url and self.sites == 1:
            self._claim_namespace(self.settings.redis_url)
        for i, site in enumerate(names):
            url = self.settings.redis_url if self.sites == 1 else None
            if not url:
                server = RedisServer().start()
                self.servers.append(server)
                url = server.url
                where = "" if self.sites == 1 else f" for site {site}"
                self.echo(f"embedded Redis{where} on {url} (log: {server.log_path})")
            self.urls[site] = url
            self._start_site(site, self._env(url, site if self.sites > 1 else None, nats_url),
                             first=i == 0)
        self.echo(f"logs in {self.dir}")
        return next(iter(self.urls.values()))

    def _claim_namespace(self, url: str) -> None:
        """Take the namespace's ``up`` key on a Redis this run did not start, or say which run
        holds it (two demos on one namespace would fight over it)."""
        client = redis.Redis.from_url(url, decode_responses=True)
        keys = Keys(self.settings.namespace)
        token = f"{socket.gethostname()} pid {os.getpid()}"
        if not client.set(keys.up_lock, token, nx=True, ex=_CLAIM_TTL):
            holder = client.get(keys.up_lock)
            client.close()
            raise ValueError(f"`sidecar up` already runs on namespace {self.settings.namespace!r} "
                             f"({holder!s}); stop it, or choose another SIDECAR_NAMESPACE")
        self._claim = (client, token)

    def _renew_claim(self) -> None:
        if self._claim is not None:
            client, token = self._claim
            with contextlib.suppress(redis.RedisError):
                client.set(Keys(self.settings.namespace).up_lock, token, xx=True, ex=_CLAIM_TTL)

    def _release_claim(self) -> None:
        if self._claim is not None:
            client, token = self._claim
            with contextlib.suppress(redis.RedisError):
                key = Keys(self.settings.namespace).up_lock
                if client.get(key) == token:
                    client.delete(key)
            client.close()
            self._claim = None

    def _start_site(self, site: str, env: dict[str, str], *, first: bool) -> None:
        py = sys.executable
        tag = "" if self.sites == 1 else f"-{site}"
        self._spawn(f"worker{tag}", [py, "-m", "celery", "-A", "workers", "worker", "-P", "solo",
                                     "-n", f"sidecar{tag}@%h", "-l", "info", "--without-mingle",
                                     "--without-gossip"], env)
        self._spawn(f"beat{tag}", [py, "-m", "celery", "-A", "workers", "beat", "-l", "info",
                                   "-s", str(self.dir / f"beat-schedule{tag}")], env)
        if self.with_flower and first:
            port = free_port()
            args = [py, "-m", "celery", "-A", "workers", "flower", "--address=127.0.0.1",
                    f"--port={port}"]
            if self.settings.dashboard_user and self.settings.dashboard_password:
                env = {**env, "FLOWER_BASIC_AUTH":
                       f"{self.settings.dashboard_user}:{self.settings.dashboard_password}"}
            self._spawn("flower", args, env)
            self.web["Flower answers"] = f"http://127.0.0.1:{port}/healthcheck"
            self.echo(f"Flower on http://127.0.0.1:{port}")
        if self.with_dashboard and first:
            port = free_port()
            self._spawn("dashboard", [py, "-c", "from ops.cli import main; main()", "dashboard",
                                      "--port", str(port)], env)
            self.web["the dashboard answers"] = f"http://127.0.0.1:{port}/healthz"
            self.echo(f"dashboard on http://127.0.0.1:{port}/ (and /api/status, /metrics)")
        if self.with_peers:
            demo = [py, "-m", "ops.demo"]
            if self.sites == 1:
                self._spawn("conductor", [*demo, "conductor"], env)
                self._spawn("follower-1", [*demo, "follower", "--nudge-every", "5"], env)
                self._spawn("follower-2", [*demo, "follower"], env)
                return
            if first:
                self._spawn(f"conductor{tag}", [*demo, "conductor"], env)
            self._spawn(f"follower{tag}", [*demo, "follower", "--nudge-every", "5"], env)

    def startup(self) -> Startup:
        """The steps of this run's start: every site's worker routing and beat keeping the duties,
        the demo peers joined and a leader elected, the sites hearing each other, the web UIs."""
        first = next(iter(self.urls))
        demo = {site: (3 if self.sites == 1 else 2 if site == first else 1) for site in self.urls}
        bridges = 1 if self.sites > 1 else 0
        steps: list[tuple[str, Check]] = [
            ("workers route (partition leases held)",
             lambda cs, k: all(c.exists(k.router_lease(0)) for c in cs.values())),
            ("beats keep the periodic duties (beat lease held)",
             lambda cs, k: all(c.exists(k.beat_lease) for c in cs.values())),
        ]
        if self.with_peers:
            steps += [
                ("demo peers joined",
                 lambda cs, k: all(c.zcard(k.members) >= demo[s] + bridges for s, c in cs.items())),
                ("a leader elected", lambda cs, k: bool(cs[first].hget(k.leader, "id"))),
            ]
        if self.sites > 1:
            steps.append(("the sites hear each other over NATS", lambda cs, k: all(
                len(heard := sites_report(c, k)) == self.sites
                and all(x["reachable"] for x in heard.values()) for c in cs.values())))
        for name, url in self.web.items():
            steps.append((name, functools.partial(_web_check, url)))
        return Startup(steps)

    def run(self, duration: float | None = None) -> int:
        """Start, report each second until stopped, stop. Returns the exit status."""
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def on_signal(signum: int, frame: object) -> None:
            self._stopping = True

        for sig in previous:
            signal.signal(sig, on_signal)
        status = 0
        try:
            self.start()
            clients = {site: redis.Redis.from_url(url, decode_responses=True)
                       for site, url in self.urls.items()}
            keys = Keys(self.settings.namespace)
            deadline = None if duration is None else time.monotonic() + duration
            live = LiveView(self.settings.namespace) if self.live else None
            startup = self.startup()
            with live if live is not None else contextlib.nullcontext():
                while not self._stopping and (deadline is None or time.monotonic() < deadline):
                    dead = [(n, p) for n, p in self.children if p.poll() is not None]
                    if dead:
                        if live is not None:
                            live.stop()
                        for name, proc in dead:
                            self.echo(f"{name} exited with {proc.returncode}; its log:\n"
                                      f"{self._tail(name)}")
                        status = 1
                        break
                    progress = startup.check(clients, keys) if startup.pending else []
                    if live is not None:
                        live.show(self._reports(clients, keys), startup.lines())
                    else:
                        for line in progress:
                            self.echo(line)
                        self.echo(self._status(clients, keys))
                    self._renew_claim()
                    time.sleep(min(1.0, max(0.0, (deadline or float("inf")) - time.monotonic())))
            for client in clients.values():
                client.close()
        finally:
            self.stop()
            self._release_claim()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return status

    def _reports(self, clients: dict[str, redis.Redis], keys: Keys) -> dict[str, Any]:
        """Each site's cluster report with its members and policy states (None: unreachable)."""
        out: dict[str, Any] = {}
        for site, client in clients.items():
            try:
                report = cluster_report(client, keys)
                report["members"] = members_report(client, keys)
                report["policy"] = {r["peer_id"]: r["state"] for r in PolicyStore(client, keys).status()}
                out[site] = report
            except redis.RedisError:
                out[site] = None
        return out

    def _status(self, clients: dict[str, redis.Redis], keys: Keys) -> str:
        """One status line per site (``site: ...`` prefixed when there are several)."""
        lines = []
        for site, client in clients.items():
            try:
                line = self._line(cluster_report(client, keys))
                if self.sites > 1:
                    heard = sites_report(client, keys)
                    reachable = sum(1 for s in heard.values() if s["reachable"])
                    line = f"{site}: {line} sites={reachable}/{len(heard)} reachable"
            except redis.RedisError as exc:
                line = f"{site}: unreachable ({exc})"
            lines.append(line)
        return "\n".join(lines)

    @staticmethod
    def _line(r: dict[str, object]) -> str:
        leader = r["leader_id"]
        leader_text = f"{str(leader)[-6:]}@{r['leader_term']}" if leader else "none"
        return (f"peers={r['cluster_size']} subscriptions={r['active_subscriptions']} "
                f"routed={r['routed']} delivered={r['delivered']} rejected={r['rejected']} "
                f"leader={leader_text} routers={len(r['routers'])}")  # type: ignore[arg-type]

    def _tail(self, name: str, lines: int = 20) -> str:
        try:
            text = (self.dir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop peers first (they leave cleanly), then beats, Flower and workers, then the servers."""
        order = sorted(self.children, key=lambda c: c[0].startswith(("worker", "beat", "flower")))
        for name, proc in order:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.echo(f"{name} did not stop in 10s; killing it")
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait()
            _signal_group(proc, signal.SIGKILL)  # anything its children left behind
        self.children.clear()
        for server in self.servers:
            server.stop()
        self.servers.clear()
        if self.nats is not None:
            self.nats.stop()
            self.nats = None


_CLAIM_TTL = 10
"""Seconds the namespace's ``up`` key outlives a run that stopped renewing it (killed)."""


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
