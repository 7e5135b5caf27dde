"""Flower as an operator uses it: its REST API, behind basic auth, on a real worker."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any

import pytest
import redis

from coordinator.cluster.membership import Membership
from coordinator.keys import Keys
from ops.embedded import free_port
from tests.e2e.helpers import sidecar_cli, start_worker
from tests.support import VENV_BIN, Processes, sidecar_env, wait_for

CREDENTIALS = "ops:flower-pa55word"


def fetch(url: str, *, auth: bool = True) -> Any:
    """GET ``url`` as JSON, with the operator's credentials unless ``auth`` is False."""
    headers = {"Authorization": "Basic " + base64.b64encode(CREDENTIALS.encode()).decode()} if auth else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as resp:
        return json.load(resp)


def answers(url: str) -> bool:
    try:
        fetch(url)
    except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
        return False
    return True


def test_flower_shows_our_worker_and_a_finished_evict_task(
        procs: Processes, redis_url: str, namespace: str, client: redis.Redis) -> None:
    env = sidecar_env(redis_url, namespace)
    start_worker(procs, env, client, "w1")
    port = free_port()
    flower = procs.start([str(VENV_BIN / "celery"), "-A", "workers", "flower", f"--port={port}",
                          "--address=127.0.0.1", f"--basic-auth={CREDENTIALS}"], env, "flower")
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: answers(base + "/api/workers"), timeout=60,
             what=f"Flower's API (its log: {procs.log(flower)[-2000:]})")
    with pytest.raises(urllib.error.HTTPError) as denied:
        fetch(base + "/api/workers", auth=False)
    assert denied.value.code == 401
    denied.value.close()

    peer = "01FLOWERPEER00000000000000"
    Membership(client, Keys(namespace)).register(peer, role="doomed")
    assert f"{peer} evicted" in sidecar_cli(env, "evict", peer)

    def evict_task() -> dict[str, Any] | None:
        tasks = fetch(base + "/api/tasks?taskname=sidecar.evict")
        return next((t for t in tasks.values() if peer in str(t.get("args"))
                     and t.get("state") == "SUCCESS"), None)

    task = wait_for(evict_task, timeout=30, what="the evict task in Flower")
    assert task["name"] == "sidecar.evict" and task["result"] == "True"
    workers = wait_for(lambda: [w for w in fetch(base + "/api/workers") if w.startswith("w1@")],
                       timeout=30, what="our worker in Flower")
    assert workers
    # the periodic duties, as beat sends them, under their readable names
    procs.beat(env)
    names = {"sidecar.sweep", "sidecar.elect", "sidecar.cluster_heartbeat"}
    seen = wait_for(lambda: names <= {t.get("name") for t in fetch(base + "/api/tasks").values()},
                    timeout=30, what="beat's periodic tasks in Flower")
    assert seen
