"""The deploy files against the code and against each other (tests/e2e/test_procfile.py runs them).

docker-compose.yml cannot run here (no Docker), so it is parsed: it must start the Procfile's
processes through the same entry points, and every service has a health check that names real
things. An entry point is real when the code has it: celery commands and their flags in celery's
click tree (Flower's in tornado's options), ``sidecar`` commands in ``ops.cli``'s, ``python -m``
modules that exist, ``python -c`` code whose imports exist.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import re
import tomllib
from pathlib import Path

import click

from tests.deploy_files import (
    DOCKERFILE,
    compose_argv,
    health_argv,
    option,
    pipeline,
    procfile,
    services,
    shell_words,
)
from tests.support import ROOT

ONLY_IN_COMPOSE = {"nats": "federation joins sites over NATS; the Procfile runs one site without it"}
"""Compose services the Procfile has no process for, and why."""

IMAGE_TOOLS = {"redis": "redis-cli", "nats": "wget"}
"""Health checks of services on third-party images: the tool their image ships (not runnable here)."""


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
        # reachable through the published port, so beyond the container's loopback: credentials
        assert option(compose_argv(service), "--address") in (None, "0.0.0.0")
    flower = services()["flower"]  # credentials required, and kept off the command line
    assert "--basic-auth" not in " ".join(compose_argv(flower))
    assert flower["environment"]["FLOWER_BASIC_AUTH"].count(":?set ") == 2
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
    assert all(services()[name]["build"] == "." for name in procfile() if name != "redis")
