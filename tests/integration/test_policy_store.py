"""PolicyStore and policy_set.lua on a real Redis: versions, history, rollback, distribution, acks."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from coordinator import ClusterSidecar, Settings
from coordinator.clock import redis_ms
from coordinator.cluster.membership import Membership
from coordinator.errors import InvalidPolicy, PolicyRejected
from coordinator.keys import Keys
from coordinator.policy.store import PolicyStore
from ops.cli import cli
from tests.support import P, async_wait_for, wait_for


def doc(tempo: int = 120, resource: str = "conductor.>") -> dict[str, Any]:
    return {"name": "conductors",
            "statements": [{"id": "tempo", "effect": "allow", "role_ids": ["conductor"],
                            "action": ["publish"], "resource": [resource]}],
            "data": {"tempo": tempo}}


@pytest.fixture
def store(client: redis.Redis, keys: Keys) -> PolicyStore:
    return PolicyStore(client, keys)


def policy_entries(client: redis.Redis, keys: Keys, peer: str) -> list[dict[str, Any]]:
    """The cluster.policy deliveries in ``peer``'s inbox, decoded."""
    out = []
    for _, f in client.xrange(keys.responses(peer)):
        assert f["t"] == "cluster.policy" and f["s"] == "sidecar" and f["k"] == "msg"
        body = json.loads(f["d"])
        assert f["i"] == f"policy:{body['version']}:{body['nonce']}"
        out.append(body)
    return out


# ---------------------------------------------------------------------------------------- documents


def test_set_gives_increasing_versions_across_documents(store: PolicyStore, client: redis.Redis,
                                                        keys: Keys) -> None:
    assert store.version() == 0
    assert store.get("conductors") is None
    routing_before = int(client.get(keys.routing_version) or 0)
    assert store.set("conductors", doc(120)) == 1
    assert store.set("players", {"statements": []}) == 2
    assert store.set("conductors", doc(130)) == 3
    assert store.version() == 3
    # every change moves the routing version, so routers reload the policies they enforce
    assert int(client.get(keys.routing_version)) == routing_before + 3


def test_get_and_documents_show_the_current_record(store: PolicyStore, client: redis.Redis) -> None:
    before = redis_ms(client)
    store.set("conductors", doc(120), by="alice")
    store.set("players", json.dumps({"statements": []}), by="bob")
    store.set("conductors", "name: ignored\nstatements: []\ndata: {tempo: 140}\n", by="carol")
    after = redis_ms(client)

    record = store.get("conductors")
    assert record is not None
    assert record["version"] == 3 and record["set_by"] == "carol" and record["action"] == "set"
    assert before <= record["set_at"] <= after
    # the name given wins over the one inside the document; YAML text is stored as the document
    assert record["document"] == {"name": "conductors", "statements": [], "data": {"tempo": 140}}

    docs = store.documents()
    assert sorted(docs) == ["conductors", "players"]
    assert docs["players"]["version"] == 2 and docs["players"]["set_by"] == "bob"
    assert store.policy_set() == {"version": 3, "policies": {
        "conductors": record["document"], "players": docs["players"]["document"]}}
    assert [p.name for p in store.policies()] == ["conductors", "players"]


def test_invalid_document_changes_nothing(store: PolicyStore, client: redis.Redis, keys: Keys) -> None:
    store.set("conductors", doc())
    bad = doc()
    bad["statements"][0]["effect"] = "perhaps"
    with pytest.raises(InvalidPolicy, match=r"statements\[0\]\.effect"):
        store.set("conductors", bad)
    with pytest.raises(InvalidPolicy, match="name"):
        store.set("no spaces allowed", doc())
    assert store.version() == 1
    assert len(store.history("conductors")) == 1
    assert client.hlen(keys.policy_docs) == 1


def test_history_records_who_when_and_what(store: PolicyStore, client: redis.Redis) -> None:
    stamps = []
    for i, who in enumerate(["alice", "bob", "carol"]):
        store.set("conductors", doc(100 + i), by=who)
        stamps.append(redis_ms(client))
    store.set("players", {"statements": []})  # another document's versions stay out of this history
    rows = store.history("conductors")
    assert [r["version"] for r in rows] == [1, 2, 3]
    assert [r["set_by"] for r in rows] == ["alice", "bob", "carol"]
    assert [r["action"] for r in rows] == ["set"] * 3
    assert [r["document"]["data"]["tempo"] for r in rows] == [100, 101, 102]
    assert all(r["set_at"] <= s for r, s in zip(rows, stamps, strict=True))
    assert [r["set_at"] for r in rows] == sorted(r["set_at"] for r in rows)
    assert [r["version"] for r in store.history("players")] == [4]
    assert store.history("nobody") == []


def test_rollback_makes_an_old_document_current_as_a_new_version(store: PolicyStore) -> None:
    store.set("conductors", doc(100))
    store.set("conductors", doc(200))
    store.set("players", {"statements": []})
    new = store.rollback("conductors", 1, by="ops")
    assert new == 4 == store.version()
    record = store.get("conductors")
    assert record is not None
    assert record["version"] == 4
    assert record["document"]["data"] == {"tempo": 100}
    assert record["action"] == "rollback to 1" and record["set_by"] == "ops"
    rows = store.history("conductors")
    assert [(r["version"], r["action"]) for r in rows] == [(1, "set"), (2, "set"), (4, "rollback to 1")]
    assert rows[-1]["document"] == rows[0]["document"]
    assert store.get("players") is not None  # other documents are untouched


def test_rollback_to_a_version_that_never_existed_raises(store: PolicyStore) -> None:
    store.set("conductors", doc(100))
    store.set("players", {"statements": []})
    for version in (0, 2, 99):  # 2 exists, but as another document's version
        with pytest.raises(InvalidPolicy, match=f"never had version {version}"):
            store.rollback("conductors", version)
    with pytest.raises(InvalidPolicy):
        store.rollback("nobody", 1)
    assert store.version() == 2


def test_engine_enforces_the_documents_in_force(store: PolicyStore) -> None:
    store.set("conductors", doc(resource="conductor.>"))
    conductor = frozenset({"conductor"})
    assert store.engine().evaluate(conductor, "publish", "conductor.tempo").allowed
    store.set("conductors", doc(resource="band.>"))
    assert not store.engine().evaluate(conductor, "publish", "conductor.tempo").allowed
    store.rollback("conductors", 1)
    assert store.engine().evaluate(conductor, "publish", "conductor.tempo").allowed


# ---------------------------------------------------------------------------------------- distribution


@pytest.fixture
def members(client: redis.Redis, keys: Keys) -> list[str]:
    ms = Membership(client, keys)
    ids = ["01PEERA0000000000000000000", "01PEERB0000000000000000000", "01PEERC0000000000000000000"]
    for peer in ids:
        assert ms.register(peer, role="conductor")
    return ids


def test_distribute_without_policies_sends_nothing(store: PolicyStore, members: list[str],
                                                   client: redis.Redis, keys: Keys) -> None:
    assert store.distribute() == 0
    assert store.distribute(force=True) == 0
    assert all(client.xlen(keys.responses(p)) == 0 for p in members)


def test_distribute_sends_the_set_to_every_live_peer_once(store: PolicyStore, members: list[str],
                                                          client: redis.Redis, keys: Keys) -> None:
    store.set("conductors", doc(120))
    store.set("players", {"statements": []})
    assert store.distribute() == 3
    for peer in members:
        (body,) = policy_entries(client, keys, peer)
        assert body["version"] == 2
        assert body["policies"] == store.policy_set()["policies"]
        assert body["nonce"]
    # right away again: everybody was just sent this version, nobody is due for a retry yet
    assert store.distribute() == 0
    assert all(len(policy_entries(client, keys, p)) == 1 for p in members)
    # only live members: a stranger named explicitly is skipped, a member that left too
    assert store.distribute(["01STRANGER0000000000000000"], force=True) == 0
    assert not client.exists(keys.responses("01STRANGER0000000000000000"))
    Membership(client, keys).leave(members[2])
    assert store.distribute(force=True) == 2
    assert len(policy_entries(client, keys, members[2])) == 1


def test_distribute_skips_peers_that_acked_the_current_version(store: PolicyStore, members: list[str],
                                                                client: redis.Redis, keys: Keys) -> None:
    a, b, _c = members
    version = store.set("conductors", doc(120))
    assert store.distribute() == 3
    nonce_a = policy_entries(client, keys, a)[0]["nonce"]
    store.record_ack(a, version, nonce_a, True, "")
    store.record_ack(b, version, "n", False, "ValueError: no tempo")
    # force skips the backoff but never resends to a peer that applied this version; a NACK retries
    assert store.distribute(force=True) == 2
    assert [len(policy_entries(client, keys, p)) for p in members] == [1, 2, 2]
    # a new version goes to everyone again, the peer that acked the old one included
    store.set("conductors", doc(130))
    assert store.distribute() == 3
    assert policy_entries(client, keys, a)[-1]["version"] == 2


def test_distribute_backs_off_exponentially(store: PolicyStore, members: list[str], client: redis.Redis,
                                            keys: Keys) -> None:
    a = members[0]
    store.set("conductors", doc())
    assert store.distribute([a]) == 1

    def state() -> dict[str, Any]:
        return dict(json.loads(client.hget(keys.policy_sent, a)))

    first = state()
    assert first["attempts"] == 1 and first["version"] == 1
    assert first["next_at"] - first["sent_at"] == 500
    assert store.distribute([a]) == 0
    # not due before next_at, due after it: polling distribute() finds the moment it becomes due
    wait_for(lambda: store.distribute([a]) == 1, timeout=5, interval=0.02, what="the first retry")
    assert redis_ms(client) >= first["next_at"]
    second = state()
    assert second["attempts"] == 2
    assert second["next_at"] - second["sent_at"] == 1000
    assert second["nonce"] != first["nonce"]
    assert store.distribute([a]) == 0
    assert store.distribute([a], force=True) == 1
    assert state()["attempts"] == 3 and state()["next_at"] - state()["sent_at"] == 2000
    assert len(policy_entries(client, keys, a)) == 3
    # a new version starts the count again
    store.set("conductors", doc(121))
    assert store.distribute([a]) == 1
    assert state()["attempts"] == 1 and state()["version"] == 2


def test_distribute_respects_the_inbox_bound(client: redis.Redis, keys: Keys, members: list[str]) -> None:
    store = PolicyStore(client, keys, inbox_maxlen=5)
    store.set("conductors", doc())
    for _ in range(300):
        store.distribute([members[0]], force=True)
    assert client.xlen(keys.responses(members[0])) < 300  # trimmed approximately to the bound


# ---------------------------------------------------------------------------------------- acks and status


def test_status_reports_synced_stale_and_nacked(store: PolicyStore, members: list[str],
                                                client: redis.Redis) -> None:
    a, b, c = members
    assert {r["state"] for r in store.status()} == {"NONE"}  # no policy yet: not "stale"
    v1 = store.set("conductors", doc(120))
    before = redis_ms(client)
    store.record_ack(a, v1, "na", True, "")
    store.record_ack(b, v1, "nb", False, "ValueError: policy lacks data.tempo")
    rows = {r["peer_id"]: r for r in store.status()}
    assert set(rows) == set(members)
    assert rows[a]["state"] == "SYNCED" and rows[a]["applied"] == v1 and rows[a]["error"] is None
    assert rows[a]["nonce"] == "na" and rows[a]["at"] >= before and rows[a]["current"] == v1
    assert rows[b]["state"] == "NACKED" and rows[b]["applied"] is None
    assert rows[b]["acked_version"] == v1
    assert rows[b]["error"] == "ValueError: policy lacks data.tempo"
    assert rows[c]["state"] == "STALE" and rows[c]["applied"] is None and rows[c]["acked_version"] is None

    v2 = store.set("conductors", doc(130))
    rows = {r["peer_id"]: r for r in store.status()}
    # a peer that applied the old version is stale now, and the status still says what it runs
    assert rows[a]["state"] == "STALE" and rows[a]["applied"] == v1 and rows[a]["current"] == v2
    assert rows[b]["state"] == "STALE"
    store.record_ack(b, v2, "nb2", True, "")
    assert {r["peer_id"]: r["state"] for r in store.status()}[b] == "SYNCED"


def test_status_lists_only_live_members(store: PolicyStore, members: list[str], client: redis.Redis,
                                        keys: Keys) -> None:
    v = store.set("conductors", doc())
    for p in members:
        store.record_ack(p, v, "n", True, "")
    Membership(client, keys).leave(members[1])
    assert [r["peer_id"] for r in store.status()] == [members[0], members[2]]


def test_a_late_ack_of_an_older_version_keeps_the_newer_state(store: PolicyStore,
                                                              members: list[str]) -> None:
    v1 = store.set("conductors", doc())
    v2 = store.set("conductors", doc())
    assert store.record_ack(members[0], v2, "n2", False, "x" * 5000)
    assert not store.record_ack(members[0], v1, "n1", True, "")  # arrived late: ignored
    row = store.status()[0]
    assert row["state"] == "NACKED" and row["acked_version"] == v2
    assert row["error"] == "x" * 1000  # bounded


# ---------------------------------------------------------------------------------------- CLI


def run_cli(redis_url: str, namespace: str, *args: str, stdin: str | None = None) -> Any:
    env = {"SIDECAR_REDIS_URL": redis_url, "SIDECAR_NAMESPACE": namespace}
    return CliRunner().invoke(cli, list(args), env=env, input=stdin)


def test_cli_set_get_list_history_rollback(redis_url: str, namespace: str, store: PolicyStore,
                                           members: list[str]) -> None:
    r = run_cli(redis_url, namespace, "policy", "set", "conductors", "-", stdin=json.dumps(doc(100)))
    assert r.exit_code == 0, r.output
    assert "version 1" in r.output and "sent to 3 peers" in r.output
    r = run_cli(redis_url, namespace, "policy", "set", "conductors", "-", "--by", "ops",
                stdin="statements: []\ndata: {tempo: 90}\n")
    assert r.exit_code == 0, r.output
    r = run_cli(redis_url, namespace, "policy", "get", "conductors", "--json")
    assert json.loads(r.output)["document"]["data"] == {"tempo": 90}
    listed = json.loads(run_cli(redis_url, namespace, "policy", "list", "--json").output)
    assert listed["conductors"]["version"] == 2 and listed["conductors"]["set_by"] == "ops"
    r = run_cli(redis_url, namespace, "policy", "rollback", "conductors", "1")
    assert r.exit_code == 0, r.output
    assert "now version 3" in r.output
    rows = json.loads(run_cli(redis_url, namespace, "policy", "history", "conductors", "--json").output)
    assert [(x["version"], x["action"]) for x in rows] == [(1, "set"), (2, "set"), (3, "rollback to 1")]
    status = json.loads(run_cli(redis_url, namespace, "policy", "status", "--json").output)
    assert status["counts"] == {"SYNCED": 0, "STALE": 3, "NACKED": 0}
    assert store.get("conductors")["document"]["data"] == {"tempo": 100}  # type: ignore[index]


def test_cli_refuses_bad_input_with_the_reason(redis_url: str, namespace: str, store: PolicyStore) -> None:
    bad = doc()
    bad["statements"][0]["action"] = "shout"
    r = run_cli(redis_url, namespace, "policy", "set", "conductors", "-", stdin=json.dumps(bad))
    assert r.exit_code != 0
    assert "statements[0].action" in r.output and "shout" in r.output
    r = run_cli(redis_url, namespace, "policy", "rollback", "conductors", "7")
    assert r.exit_code != 0 and "never had version 7" in r.output
    r = run_cli(redis_url, namespace, "policy", "get", "conductors")
    assert r.exit_code != 0 and "no policy named" in r.output
    assert store.version() == 0


# ---------------------------------------------------------------------------------------- a router


def open_to(resource: str) -> dict[str, Any]:
    return {"statements": [{"id": f"open-{resource}", "effect": "allow", "role_ids": "*", "action": "*",
                            "resource": resource}]}


async def test_router_enforces_a_policy_change_on_the_very_next_request(
        settings: Settings, store: PolicyStore, client: redis.Redis, keys: Keys) -> None:
    st = settings.replace(enforce_policy=True, router_lease=0.6, request_timeout=3.0)
    store.set("p", open_to("a.>"))
    sc = ClusterSidecar(settings=st)
    await sc.setup()
    try:
        async with P(namespace=st.namespace, settings=st) as peer:
            await peer.cluster_subscribe("a.b", lambda m: None)
            store.set("p", open_to("z.>"))  # revokes a.>, grants z.>
            await peer.cluster_publish("a.b", 1)  # publishes are re-checked once the router sees the change
            await async_wait_for(lambda: client.xlen(keys.deadletter) == 1, what="the revoked publish")
            # Regression (fixed) (coordinator/requests.py, RequestHandler._subscribe): the subscribe is
            # authorized with the guard's cached engine *before* the script reports that the routing
            # version moved, so the first subscribe after a policy change is judged by the old
            # policy (a revoked permission is granted once more, a new one refused once).
            # Reproduce: set a policy, subscribe, set a policy that revokes it, subscribe again.
            store.set("p", open_to("y.>"))  # revokes z.>, grants y.>
            await peer.cluster_subscribe("y.b", lambda m: None)  # the new grant works at once
            store.set("p", open_to("x.>"))  # revokes y.>
            with pytest.raises(PolicyRejected):
                await peer.cluster_subscribe("y.c", lambda m: None)
    finally:
        await sc.teardown()
