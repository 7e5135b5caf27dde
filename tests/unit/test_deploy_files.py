"""docker-compose.yml and Procfile describe the same processes the project runs (Docker cannot run
here, so the compose file is checked by parsing it)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_runs_worker_beat_flower_and_peers_against_redis_and_nats() -> None:
    services = compose()["services"]
    assert {"redis", "nats", "worker", "beat", "flower", "conductor", "follower"} <= set(services)
    assert services["worker"]["command"][:4] == ["celery", "-A", "workers", "worker"]
    assert services["beat"]["command"][:4] == ["celery", "-A", "workers", "beat"]
    for name in ("worker", "beat", "flower", "conductor", "follower"):
        env = services[name]["environment"]
        assert env["SIDECAR_REDIS_URL"].startswith("redis://redis:")
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "noeviction" in services["redis"]["command"]  # membership keys must never be evicted


def test_compose_flower_needs_credentials_and_binds_loopback() -> None:
    flower = compose()["services"]["flower"]
    assert "FLOWER_BASIC_AUTH" in flower["environment"]
    assert not any("--basic-auth" in part for part in flower["command"])
    assert all(port.startswith("127.0.0.1:") for port in flower["ports"])


def test_procfile_names_the_same_processes() -> None:
    entries = dict(line.split(":", 1) for line in (ROOT / "Procfile").read_text().splitlines()
                   if line.strip())
    assert {"redis", "worker", "beat", "flower", "conductor", "follower"} <= set(entries)
    assert shlex.split(entries["worker"])[:4] == ["celery", "-A", "workers", "worker"]
    assert "--address=127.0.0.1" in entries["flower"]
