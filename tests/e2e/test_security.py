"""Security end to end: signed requests through a real worker, Redis ACL users, JSON-only Celery, no
secrets in logs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from redis.exceptions import NoPermissionError

from coordinator.keys import PEER_GROUP, Keys
from coordinator.policy.auth import FRESHNESS_MS, TAG_HEX, Identities, Signer, canonical
from coordinator.settings import Settings
from ops.embedded import RedisServer
from tests.e2e.helpers import Recorder, sidecar_cli, start_worker
from tests.support import TEST_PEER_KEY, Peer, Processes, async_wait_for, request_entry, sidecar_env, wait_for

DASHBOARD_PASSWORD = "dashboard-pa55word-never-logged"



def sign_by_hand(secret: str, fields: dict[str, str]) -> dict[str, str]:
    """``fields`` with a valid signature over whatever nonce ``n`` they already carry."""
    mac = hmac.new(secret.encode(), canonical(fields), hashlib.sha256)
    return {**fields, "sig": mac.hexdigest()[:TAG_HEX]}


def dead_letters(client: redis.Redis, keys: Keys) -> dict[str, dict[str, str]]:
    """Dead-letter entries by the id of the request entry they refused."""
    return {f["entry"]: f for _, f in client.xrange(keys.deadletter)}


# ---------------------------------------------------------------------------------------- signed requests


async def test_forged_tampered_replayed_and_unsigned_requests_are_refused(
        procs: Processes, redis_url: str, namespace: str, client: redis.Redis,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    keys = Keys(namespace)
    ids = Identities(client, keys, TEST_PEER_KEY)
    a_creds, b_creds = ids.add("a", ["conductor"]), ids.add("b", ["conductor"])
    a_secret, b_secret = a_creds["SIDECAR_PEER_SECRET"], b_creds["SIDECAR_PEER_SECRET"]
    env = sidecar_env(redis_url, namespace, auth="required", dashboard_user="admin",
                      dashboard_password=DASHBOARD_PASSWORD)
    worker = start_worker(procs, env, client, "w1")
    st = Settings(redis_url=redis_url, namespace=namespace, auth="required", request_timeout=10.0)
    a = Peer(namespace=namespace, id=a_creds["SIDECAR_PEER_ID"], settings=st, secret=a_secret)
    b = Peer(namespace=namespace, id=b_creds["SIDECAR_PEER_ID"], settings=st, secret=b_secret)
    async with a, b:
        got = Recorder()
        await a.cluster_subscribe("chat.>", got)
        # an entry b really signed, captured from the request stream (retried if the router's
        # periodic trim removed it before we read it)
        captured: dict[str, str] = {}
        sent: list[Any] = []
        while not captured and len(sent) < 20:
            sent.append({"n": len(sent)})
            mid = await b.cluster_publish("chat.hello", sent[-1])
            captured = request_entry(client, keys.peer_requests(b.id), mid)
        assert captured.get("sig"), "could not capture a signed entry"
        await got.wait_for_data(sent[-1])

        now_ms = int(time.time() * 1000)
        stale = sign_by_hand(b_secret, {"k": "pub", "s": b.id, "t": "chat.stale", "d": '"stale"',
                                        "n": str((now_ms - 3 * FRESHNESS_MS) * 1000)})
        tampered = {**Signer(b_secret).sign({"k": "pub", "s": b.id, "t": "chat.tampered", "d": '"a"'}),
                    "d": '"tampered"'}
        attacks: dict[str, tuple[dict[str, str], str]] = {
            "forged sender": (Signer(a_secret).sign(
                {"k": "pub", "s": b.id, "t": "chat.forged", "d": '"forged"'}), "bad signature"),
            "bad signature": ({**captured, "t": "chat.badsig", "sig": "ab" * 16}, "bad signature"),
            "tampered": (tampered, "bad signature"),
            "replayed": (dict(captured), "replayed"),
            "stale": (stale, "stale"),
            "unsigned": ({"k": "pub", "s": b.id, "t": "chat.unsigned", "d": '"unsigned"'}, "unsigned"),
            "unsigned subscribe": ({"k": "sub", "s": b.id, "t": "chat.>", "r": "sneaky"}, "unsigned"),
            "forged leave": ({"k": "leave", "s": a.id}, "unsigned"),
            "stranger": (Signer("guess").sign({"k": "pub", "s": "01STRANGER0000000000000000",
                                               "t": "chat.x", "d": '"x"'}), "no identity"),
        }
        entry_ids = {client.xadd(keys.requests(0), fields): name for name, (fields, _) in attacks.items()}
        await b.cluster_publish("chat.after", "after")
        await got.wait_for_data("after")

        assert got.data == [*sent, "after"], "a refused request reached a subscriber"
        dead = dead_letters(client, keys)
        assert set(entry_ids) <= set(dead)
        for eid, name in entry_ids.items():
            entry, expected = dead[eid], attacks[name][1]
            assert entry["reason"] == "unauthenticated", (name, entry)
            assert expected in entry["message"], (name, entry["message"])
        # nothing the attacks asked for happened: a is still a member, b has no subscription
        assert client.zscore(keys.members, a.id) is not None
        assert sorted(client.hkeys(keys.subs)) == sorted([f"{a.id} chat.>", f"{a.id} cluster.leader",
                                                         f"{b.id} cluster.leader"])
        # good traffic between the two authenticated peers is unaffected, both ways
        back = Recorder()
        await b.cluster_subscribe("reply.>", back)
        await a.cluster_publish("reply.to-b", "hi b")
        await back.wait_for_data("hi b")

    # no secret in the worker's log, the test's own log records, or the dead letters
    log = procs.log(worker)
    assert "rejected" in log  # it did log the refusals ...
    for secret in (a_secret, b_secret, DASHBOARD_PASSWORD):
        assert secret not in log  # ... but never a secret
        assert secret not in caplog.text
        assert all(secret not in json.dumps(f) for f in dead_letters(client, keys).values())


def test_cli_never_prints_secrets(redis_url: str, namespace: str) -> None:
    env = sidecar_env(redis_url, namespace, peer_secret="peer-secret-never-printed",
                      dashboard_password=DASHBOARD_PASSWORD)
    out = sidecar_cli(env, "doctor", "--json")
    settings = json.loads(out)["settings"]
    assert settings["peer_secret"] == "***" and settings["dashboard_password"] == "***"
    assert "peer-secret-never-printed" not in out and DASHBOARD_PASSWORD not in out
    settings_repr = repr(Settings.from_env(env))
    assert "peer-secret-never-printed" not in settings_repr and DASHBOARD_PASSWORD not in settings_repr


# ---------------------------------------------------------------------------------------- Redis ACL


def acl_env(out: str) -> dict[str, str]:
    """``KEY=VALUE`` lines printed by ``sidecar peer add`` as a dict."""
    return dict(line.split("=", 1) for line in out.strip().splitlines())


async def test_redis_acl_confines_each_peer_to_its_own_inbox(
        procs: Processes, fresh_redis: RedisServer, namespace: str) -> None:
    keys = Keys(namespace)
    admin = redis.Redis.from_url(fresh_redis.url, decode_responses=True)
    env = sidecar_env(fresh_redis.url, namespace, auth="required")
    a_env = acl_env(sidecar_cli(env, "peer", "add", "a", "--role", "conductor", "--redis-acl"))
    b_env = acl_env(sidecar_cli(env, "peer", "add", "b", "--role", "conductor", "--redis-acl"))
    assert set(a_env) == {"SIDECAR_PEER_ID", "SIDECAR_PEER_SECRET", "SIDECAR_REDIS_USER",
                          "SIDECAR_REDIS_PASSWORD"}
    a_id, b_id = a_env["SIDECAR_PEER_ID"], b_env["SIDECAR_PEER_ID"]
    start_worker(procs, env, admin, "w1")

    def as_user(creds: dict[str, str]) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=fresh_redis.port, username=creds["SIDECAR_REDIS_USER"],
                           password=creds["SIDECAR_REDIS_PASSWORD"], decode_responses=True)

    def url_of(creds: dict[str, str]) -> str:
        return (f"redis://{creds['SIDECAR_REDIS_USER']}:{creds['SIDECAR_REDIS_PASSWORD']}"
                f"@127.0.0.1:{fresh_redis.port}/0")

    # the peers themselves run entirely as their ACL users
    st = Settings(namespace=namespace, auth="required", request_timeout=10.0)
    a = Peer(namespace=namespace, id=a_id, settings=st.replace(redis_url=url_of(a_env)),
             secret=a_env["SIDECAR_PEER_SECRET"])
    b = Peer(namespace=namespace, id=b_id, settings=st.replace(redis_url=url_of(b_env)),
             secret=b_env["SIDECAR_PEER_SECRET"])
    spy = as_user(a_env)
    try:
        async with a, b:
            got = Recorder()
            await b.cluster_subscribe("to-b.>", got)
            await a.cluster_publish("to-b.hello", "for b only")
            await got.wait_for_data("for b only")
            assert spy.ping()

            # a reading b's inbox: refused, by group read and by range read
            with pytest.raises(NoPermissionError):
                spy.xreadgroup(PEER_GROUP, "spy", {keys.responses(b_id): "0"})
            with pytest.raises(NoPermissionError):
                spy.xrange(keys.responses(b_id))
            with pytest.raises(NoPermissionError):
                spy.xgroup_create(keys.responses(b_id), "spy", id="0")
            # ... nor writing into it (forged deliveries), nor reading requests or identities,
            # nor running scripts (membership changes go through the router)
            with pytest.raises(NoPermissionError):
                spy.xadd(keys.responses(b_id), {"k": "msg", "t": "to-b.x", "d": "1", "s": "sidecar"})
            with pytest.raises(NoPermissionError):
                spy.xreadgroup("routers", "spy", {keys.requests(0): "0"})
            with pytest.raises(NoPermissionError):
                spy.hgetall(keys.identities)
            with pytest.raises(NoPermissionError):
                spy.eval("return 1", 0)
            with pytest.raises(NoPermissionError):
                spy.xadd(keys.system, {"k": "pub", "s": "sidecar", "t": "cluster.leader", "d": "{}"})

            # a reading its own inbox works (a private group, so a's own reader loses nothing). The
            # peer deletes what it handled, so the administrator puts a probe entry there: a may
            # not append to its own inbox (the largest possible id would stop every delivery to it)
            spy.xgroup_create(keys.responses(a_id), "probe", id="$")
            with pytest.raises(NoPermissionError):
                spy.xadd(keys.responses(a_id), {"k": "probe"}, id="18446744073709551615-18446744073709551615")
            probe_id = admin.xadd(keys.responses(a_id), {"k": "probe"})
            own = spy.xreadgroup("probe", "probe", {keys.responses(a_id): ">"}, count=100)
            assert own and [e[0] for e in own[0][1]] == [probe_id], "a could not read its own inbox"
            # ... and writing requests works, to its own request stream alone (unsigned, so the
            # router dead-letters it); the shared streams and b's are out of its reach
            eid = spy.xadd(keys.peer_requests(a_id), {"k": "pub", "s": a_id, "t": "to-b.probe", "d": "1"})
            await async_wait_for(lambda: eid in dead_letters(admin, keys), what="the probe refused")
            assert dead_letters(admin, keys)[eid]["reason"] == "unauthenticated"
            for stream in (keys.requests(0), keys.peer_requests(b_id)):
                with pytest.raises(NoPermissionError):
                    spy.xadd(stream, {"k": "pub", "s": a_id, "t": "to-b.probe", "d": "1"})
            assert got.data == ["for b only"]
    finally:
        spy.close()
        admin.close()


async def test_a_peer_holding_its_own_credentials_cannot_touch_anyone_elses_requests(
        procs: Processes, fresh_redis: RedisServer, namespace: str) -> None:
    """Bob attacks with his own ACL user and secret: ids, trims, deletes, acks and groups on every
    request stream, then a flood of his own. Alice's publishes arrive, in order, throughout."""
    keys = Keys(namespace)
    admin = redis.Redis.from_url(fresh_redis.url, decode_responses=True)
    env = sidecar_env(fresh_redis.url, namespace, auth="required")
    creds = {name: acl_env(sidecar_cli(env, "peer", "add", name, "--role", "player", "--redis-acl"))
             for name in ("alice", "bob", "carol")}
    start_worker(procs, env, admin, "w1")

    def url_of(c: dict[str, str]) -> str:
        return (f"redis://{c['SIDECAR_REDIS_USER']}:{c['SIDECAR_REDIS_PASSWORD']}"
                f"@127.0.0.1:{fresh_redis.port}/0")

    st = Settings(namespace=namespace, auth="required", request_timeout=10.0)
    alice, carol = (Peer(namespace=namespace, id=creds[n]["SIDECAR_PEER_ID"],
                         settings=st.replace(redis_url=url_of(creds[n])),
                         secret=creds[n]["SIDECAR_PEER_SECRET"]) for n in ("alice", "carol"))
    bob_id = creds["bob"]["SIDECAR_PEER_ID"]
    bob = redis.Redis.from_url(url_of(creds["bob"]), decode_responses=True)
    try:
        async with alice, carol:
            got = Recorder()
            await carol.cluster_subscribe("chat.>", got)
            sent = 0

            async def alice_says(count: int) -> None:
                nonlocal sent
                for _ in range(count):
                    await alice.cluster_publish("chat.x", sent)
                    sent += 1
                await got.wait_for_data(sent - 1)

            await alice_says(5)
            future = f"{int(time.time() * 1000) + 600_000}-0"
            others = (keys.requests(0), keys.system, keys.peer_requests(alice.id))
            for stream in others:  # ids, trims, deletes, acks, groups: none reaches them
                for attack in (lambda s: bob.xadd(s, {"k": "pub"}, id=future),
                               lambda s: bob.xadd(s, {"k": "pub"}, maxlen=0),
                               lambda s: bob.xdel(s, "1-0"),
                               lambda s: bob.xack(s, "routers", "1-0"),
                               lambda s: bob.xgroup_create(s, "routers", id="$"),
                               lambda s: bob.xtrim(s, maxlen=0)):
                    with pytest.raises(NoPermissionError):
                        attack(stream)
            with pytest.raises(NoPermissionError):  # his inbox he may read, never append to
                bob.xadd(keys.responses(bob_id), {"k": "msg"}, id="18446744073709551615-18446744073709551615")
            # his own stream he can wreck, for himself alone: a far-future id, then the largest
            own = keys.peer_requests(bob_id)
            bob.xadd(own, {"k": "pub", "s": bob_id, "t": "chat.x", "d": "1"}, id=future)
            bob.xadd(own, {"k": "pub", "s": bob_id, "t": "chat.x", "d": "1"},
                     id="18446744073709551615-18446744073709551615")
            await alice_says(5)
            # and flood it: alice's next publishes pass while his flood is still being refused
            admin.delete(own)
            pipe = bob.pipeline(transaction=False)
            for n in range(200_000):
                pipe.xadd(own, {"k": "pub", "s": bob_id, "t": "chat.x", "d": str(n)})
            pipe.execute()
            await alice_says(20)
            unread = admin.xinfo_groups(own)[0]
            assert int(unread.get("lag") or 0) + int(unread.get("pending") or 0) > 0, \
                "alice's publishes waited for bob's whole flood"
    finally:
        bob.close()
        admin.close()
    assert got.data == list(range(sent))  # every one of alice's, once, in order


# ---------------------------------------------------------------------------------------- JSON only


@pytest.fixture
def sender_app(redis_url: str, namespace: str) -> Iterator[Celery]:
    """A Celery client configured like workers.application, except that it may send pickle."""
    keys = Keys(namespace)
    app = Celery("pickle-sender", set_as_current=False)
    app.conf.update(
        broker_url=redis_url, result_backend=redis_url,
        broker_transport_options={"global_keyprefix": keys.celery_prefix},
        result_backend_transport_options={"global_keyprefix": keys.celery_prefix},
        broker_connection_retry_on_startup=True,
        task_default_queue=f"sidecar.{namespace}",
        task_serializer="json", result_serializer="json",
        accept_content=["json", "pickle"], result_accept_content=["json"],
    )
    try:
        yield app
    finally:
        app.close()


def test_pickled_task_is_refused_while_json_round_trips(
        procs: Processes, redis_url: str, namespace: str, client: redis.Redis, sender_app: Celery) -> None:
    worker = start_worker(procs, sidecar_env(redis_url, namespace), client, "w1")
    pickled = sender_app.send_task("sidecar.ping", args=[{"via": "pickle"}], serializer="pickle")
    assert pickled.backend is not None
    # one queue, one solo worker: once a JSON task sent after it round-trips, the pickled one was
    # taken off the queue and dealt with
    as_json = sender_app.send_task("sidecar.ping", args=[{"via": "json"}])
    assert as_json.get(timeout=30) == {"via": "json"}
    wait_for(lambda: f"Task sidecar.ping[{as_json.id}] succeeded" in procs.log(worker), 10,
             what="the worker to log the JSON task")
    log = procs.log(worker)
    assert "Refusing to deserialize untrusted content of type pickle" in log, log[-3000:]
    assert pickled.state == "PENDING"  # never executed: no result, no failure recorded
    assert pickled.id not in log  # it never became a task (received, started or succeeded)
    assert worker.poll() is None  # and the worker carries on
    again = sender_app.send_task("sidecar.ping", args=[2])
    assert again.get(timeout=30) == 2
