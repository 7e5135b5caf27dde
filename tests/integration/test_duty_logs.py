"""The periodic duties log at INFO only when something changed, against a real Redis."""

from __future__ import annotations

import logging

import pytest
import redis

from coordinator.cluster.duties import Duties
from coordinator.cluster.membership import Membership
from coordinator.keys import Keys
from coordinator.policy.store import PolicyStore
from coordinator.settings import Settings
from tests.support import wait_for

A, B = "01DUTYLOGA00000000000000000", "01DUTYLOGB00000000000000000"


def info_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]


def every_duty(duties: Duties) -> None:
    duties.sweep()
    duties.elect()
    duties.cluster_heartbeat()
    duties.distribute_policies()
    duties.watch_inboxes()
    duties.trim()


def test_duties_say_at_info_what_changed_and_nothing_else(
        client: redis.Redis, settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    settings = settings.replace(heartbeat_interval=0.1, member_ttl=0.3)
    keys = Keys(settings.namespace)
    # two Duties, as two worker processes (prefork children) each have one: what is news is
    # decided from Redis, so each change is still said once
    duties, other, members = Duties(client, settings), Duties(client, settings), Membership(client, keys)
    caplog.set_level(logging.DEBUG, logger="sidecar.duties")
    caplog.set_level(logging.DEBUG, logger="sidecar.policy")
    members.register(A)
    members.register(B)
    every_duty(duties)
    assert f"leader is now {A} (term 1, periodic)" in info_lines(caplog)

    caplog.clear()
    for _ in range(5):  # nothing changes: not one line at info, and the runs are there at debug
        members.heartbeat(A)
        members.heartbeat(B)
        every_duty(duties)
    assert info_lines(caplog) == []
    assert sum("election: kept" in r.getMessage() for r in caplog.records) == 5

    # a new policy version is news once; sending it again to peers that have not answered is not
    PolicyStore(client, keys).set("players", {"statements": []})
    for _ in range(3):
        every_duty(duties)
        every_duty(other)
    assert info_lines(caplog) == ["sending policy version 1 to 2 peer(s) for the first time"]

    # the leader falls silent: evicted, and the lead moves to B
    caplog.clear()

    def evicted() -> bool:
        members.heartbeat(B)
        return duties.sweep() == [A]

    wait_for(evicted, 10, interval=0.05, what="A evicted by the sweep")
    assert info_lines(caplog) == [f"evicted {A}: silent for more than 0.3s",
                                  f"leader is now {B} (term 2, expired)"]
    # B leaves by an operator's eviction; the cluster has no leader, said once
    caplog.clear()
    assert duties.evict(B)
    for _ in range(3):
        every_duty(duties)
        every_duty(other)
    assert info_lines(caplog) == [
        f"evicted {B} on request",
        "no leader: the leader is gone and no eligible member is live (term 3, evicted)"]
