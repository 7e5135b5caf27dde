"""Reading the deploy files (Procfile, docker-compose.yml, Dockerfile) as their tools do: the
Procfile with honcho's parser and ``sh``'s expansion, compose's health checks as Docker runs them."""

from __future__ import annotations

import os
import shlex
import subprocess
from typing import Any

import yaml
from honcho.environ import parse_procfile

from tests.support import ROOT

PROCFILE = ROOT / "Procfile"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"


def procfile() -> dict[str, str]:
    """Process name -> command line, as honcho itself reads the Procfile."""
    return dict(parse_procfile(PROCFILE.read_text()).processes)


def services() -> dict[str, dict[str, Any]]:
    """docker-compose.yml's services (YAML merge keys resolved)."""
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return dict(data["services"])


def shell_words(line: str) -> list[str]:
    """The argv ``sh`` makes of a Procfile ``line``, each ``${VAR:-default}`` at its default (as for
    an operator who sets none of them)."""
    done = subprocess.run(["sh", "-c", f'set -- {line}; printf "%s\\0" "$@"'], capture_output=True,
                          text=True, check=True, timeout=10, env={"PATH": os.defpath})
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
