"""The deploy files against the code and against each other.

The Procfile runs under honcho as an operator runs it, pointed by environment at a Redis and ports
of the test's own. docker-compose.yml cannot run here (no Docker), so it is parsed: it must start
the Procfile's processes through the same entry points, and every service has a health check that
names real things; the health checks of the sidecar's own services are also run, as Docker would
run them inside a container, against the processes honcho started (and before those start, when
they must fail).
"""

from __future__ import annotations

import ast
import base64
import contextlib
import importlib
import importlib.util
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import click
import pytest
import redis
import yaml
from honcho.environ import parse_procfile

from ops.embedded import free_port, redis_server_binary
from tests.support import ROOT, VENV_BIN, sidecar_env, wait_for

PROCFILE = ROOT / "Procfile"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

ONLY_IN_COMPOSE = {"nats": "federation joins sites over NATS; the Procfile runs one site without it"}
"""Compose services the Procfile has no process for, and why."""

IMAGE_TOOLS = {"redis": "redis-cli", "nats": "wget"}
"""Health checks of services on third-party images: the tool their image ships (not runnable here)."""

FLOWER_AUTH = "ops:flower-pa55word"
DASHBOARD_USER, DASHBOARD_PASSWORD = "ops", "dashboard-pa55word"


# ------------------------------------------------------------------ reading the files
def procfile() -> dict[str, str]:
    """Process name -> command line, as honcho itself reads the Procfile."""
    return dict(parse_procfile(PROCFILE.read_text()).processes)


def services() -> dict[str, dict[str, Any]]:
    """docker-compose.yml's services (YAML merge keys resolved)."""
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return dict(data["services"])


def shell_words(line: str, env: dict[str, str] | None = None) -> list[str]:
    """The argv ``sh`` makes of a Procfile ``line``, its ``${VAR:-default}`` expanded with ``env``
    (none given: the defaults, as for an operator who sets nothing)."""
    done = subprocess.run(["sh", "-c", f'set -- {line}; printf "%s\\0" "$@"'], capture_output=True,
                          text=True, check=True, timeout=10, env=env or {"PATH": os.defpath})
    return done.stdout.split("\0")[:-1]


def compose_argv(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def health_argv(service: dict[str, Any]) -> list[str]:
    """What Docker runs for the service's health check (``$$`` is compose's escaped ``$``)."""
    kind, *rest = service["healthcheck"]["test"]
    rest = [str(a).replace("$$", "$") for a in rest]
    if kind == "CMD":
        return rest
    assert kind == "CMD-SHELL" and len(rest) == 1, f"unexpected healthcheck test {kind!r}"
    return ["sh", "-c", rest[0]]


def pipeline(argv: list[str]) -> list[list[str]]:
    """The commands a health check runs: one, or each command of an ``sh -c`` pipeline."""
    if argv[:2] != ["sh", "-c"]:
        return [argv]
    lexer = shlex.shlex(argv[2], posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token == "|":
            commands.append([])
        else:
            assert token not in (";", "&&", "||", "&"), f"keep health checks one pipeline: {argv[2]}"
            commands[-1].append(token)
    return commands


def option(argv: list[str], name: str) -> str | None:
    """The value of ``name`` in ``argv`` (``--name value`` or ``--name=value``)."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


# ------------------------------------------------------------------ entry points
def entry_point(argv: list[str]) -> tuple[str, ...]:
    """What a command runs, whatever its flags: ``('celery', app, subcommand)``, ``('sidecar',
    subcommand)``, ``('python -m', module, first argument)`` or ``(program,)``."""
    program = Path(argv[0]).name
    positional = [a for a in argv[1:] if not a.startswith("-")]
    if program == "celery":
        app = option(argv, "-A") or option(argv, "--app") or ""
        rest = argv[argv.index(app) + 1:]
        return ("celery", app, next(a for a in rest if not a.startswith("-")))
    if program == "sidecar":
        return ("sidecar", positional[0])
    if program.startswith("python") and argv[1] == "-m":
        return ("python -m", argv[2], *[a for a in argv[3:] if not a.startswith("-")][:1])
    return (program,)


def check_celery(argv: list[str]) -> None:
    """``celery -A APP SUB ...``: the app imports and is a Celery app, SUB is a celery command
    (flower's comes from its plugin) and every flag is one SUB takes."""
    from celery import Celery
    from celery.app.control import Inspect
    from celery.bin.celery import celery as celery_cli

    _, app, sub = entry_point(argv)
    assert importlib.util.find_spec(app) is not None, f"celery -A {app}: no module {app}"
    assert isinstance(getattr(importlib.import_module(app), "app", None), Celery), f"{app}.app"
    assert sub in celery_cli.commands, f"`celery {sub}` is no celery command"
    args = argv[argv.index(sub) + 1:]
    flags = {a.split("=", 1)[0] for a in args if a.startswith("-")}
    if sub == "flower":  # Flower parses its own flags with tornado.options
        import flower.options  # noqa: F401 (defines Flower's options)
        from tornado.options import options

        unknown = {f for f in flags if f.lstrip("-") not in options}
    else:
        command = celery_cli.commands[sub]
        known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        unknown = flags - known
    assert not unknown, f"`celery {sub}` takes no {sorted(unknown)}"
    if sub == "inspect":
        method = next(a for a in args if not a.startswith("-"))
        assert callable(getattr(Inspect, method, None)), f"celery inspect has no {method!r}"


def check_sidecar(argv: list[str]) -> None:
    """``sidecar SUB ...``: the console script is ops.cli's, SUB is a command of its click tree and
    the arguments parse (click refuses unknown options and bad values)."""
    from ops.cli import cli

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["sidecar"] == "ops.cli:main"
    sub, *args = argv[1:]
    command = cli.commands.get(sub)
    assert command is not None, f"`sidecar {sub}` is no sidecar command"
    try:
        command.make_context(sub, list(args)).close()
    except click.ClickException as exc:
        raise AssertionError(f"`sidecar {' '.join(argv[1:])}`: {exc.format_message()}") from None


def check_python(argv: list[str]) -> None:
    """``python -m MODULE``: the module exists; ``python -c CODE``: it compiles and everything it
    imports exists."""
    if argv[1] == "-m":
        assert importlib.util.find_spec(argv[2]) is not None, f"python -m {argv[2]}: no such module"
        return
    assert argv[1] == "-c", argv
    tree = ast.parse(argv[2])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert importlib.util.find_spec(alias.name) is not None, f"no module {alias.name}"
        elif isinstance(node, ast.ImportFrom) and node.module:
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"


def check_real(argv: list[str]) -> None:
    """Fail unless ``argv`` runs a real entry point of this project (see the check_* functions)."""
    program = Path(argv[0]).name
    if program == "celery":
        check_celery(argv)
    elif program == "sidecar":
        check_sidecar(argv)
    elif program.startswith("python"):
        check_python(argv)
    else:
        raise AssertionError(f"{argv[0]!r} is no entry point of this project")


# ------------------------------------------------------------------ the files, parsed
def test_procfile_and_compose_run_the_same_processes_through_the_same_entry_points() -> None:
    lines, svcs = procfile(), services()
    assert {"worker", "beat", "flower", "dashboard", "conductor"} <= set(lines)
    assert set(lines) == set(svcs) - set(ONLY_IN_COMPOSE)
    for name, line in lines.items():
        ours, theirs = shell_words(line), compose_argv(svcs[name])
        assert entry_point(ours) == entry_point(theirs), f"{name}: {ours} vs {theirs}"
        if name != "redis":
            check_real(ours)
            check_real(theirs)
    # the worker's node name is what its health check pings
    worker = option(shell_words(lines["worker"]), "-n")
    assert worker == option(compose_argv(svcs["worker"]), "-n") == "router@%h"
    assert option(health_argv(svcs["worker"])[2].split(), "-d") == "router@$HOSTNAME"


def test_both_keep_redis_from_evicting_and_the_procfile_redis_on_loopback() -> None:
    ours, theirs = shell_words(procfile()["redis"]), compose_argv(services()["redis"])
    assert option(ours, "--maxmemory-policy") == option(theirs, "--maxmemory-policy") == "noeviction"
    assert option(ours, "--bind") == "127.0.0.1"


def test_every_compose_service_has_a_health_check_naming_real_things() -> None:
    for name, service in services().items():
        assert "healthcheck" in service, f"service {name} has no healthcheck"
        commands = pipeline(health_argv(service))
        if name in IMAGE_TOOLS:
            assert [c[0] for c in commands] == [IMAGE_TOOLS[name]], name
            continue
        for argv in commands:
            check_real(argv)
    # the third-party probes ask what their service serves
    assert health_argv(services()["redis"]) == ["redis-cli", "ping"]
    nats = services()["nats"]
    monitor = option(compose_argv(nats), "-m")
    assert f"http://127.0.0.1:{monitor}/healthz" in health_argv(nats)


def test_compose_publishes_flower_and_the_dashboard_on_the_port_they_listen_on() -> None:
    for name, env_port in (("flower", "FLOWER_PORT"), ("dashboard", "SIDECAR_DASHBOARD_PORT")):
        service = services()[name]
        port = option(compose_argv(service), "--port")
        assert port == service["environment"][env_port], f"{name}: its health check reads {env_port}"
        assert service["ports"] == [f"127.0.0.1:{port}:{port}"], name
        # beyond the container's loopback only with credentials
        assert option(compose_argv(service), "--address") in (None, "0.0.0.0")
    assert "--basic-auth=" in " ".join(compose_argv(services()["flower"]))
    dashboard_env = services()["dashboard"]["environment"]
    assert {"SIDECAR_DASHBOARD_USER", "SIDECAR_DASHBOARD_PASSWORD"} <= set(dashboard_env)


def test_compose_starts_what_needs_others_once_those_are_healthy() -> None:
    svcs = services()
    for name, service in svcs.items():
        for needed, how in (service.get("depends_on") or {}).items():
            assert needed in svcs and how == {"condition": "service_healthy"}, f"{name} -> {needed}"
    assert {"redis", "nats"} <= set(svcs["worker"]["depends_on"])
    assert "worker" in svcs["conductor"]["depends_on"]


def test_the_image_holds_every_package_and_runs_the_compose_worker() -> None:
    text = DOCKERFILE.read_text()
    copied = set(re.findall(r"^COPY (\S+) \1$", text, flags=re.M))
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = setuptools.get("packages")
    packages = listed if isinstance(listed, list) else listed["find"]["include"]
    assert {p.split(".")[0] for p in packages} <= copied
    cmd = json.loads(re.findall(r"^CMD (.+)$", text, flags=re.M)[-1])
    assert cmd == compose_argv(services()["worker"])
    assert all(s.get("build") == "." for s in services().values() if s.get("image", "").startswith(
        "plantangenet-sidecar"))


# ------------------------------------------------------------------ the Procfile, run
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


@pytest.mark.e2e
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
    with Honcho(["redis"], env, tmp_path / "honcho.log") as honcho:
        client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True, socket_timeout=5)

        def ours() -> bool:  # answering, and honcho's child (not another server on the port)
            honcho.running()
            pids = honcho.pids()
            try:
                pid = int(client.info("server")["process_id"])
            except redis.ConnectionError:
                return False
            return "redis" in pids and os.getpgid(pid) == pids["redis"]

        wait_for(ours, timeout=30, what=f"the Procfile's redis on port {port}")
        config = client.config_get("*")
        client.close()
        assert config["maxmemory-policy"] == "noeviction"
        assert config["bind"] == "127.0.0.1" and config["save"] == "" and config["appendonly"] == "no"
        pid = honcho.pids()["redis"]
        honcho.stop()
        wait_for(lambda: not group_alive(pid), timeout=30, what="redis-server to exit")
