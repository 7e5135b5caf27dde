"""Signed requests: Signer and verify, identities in Redis, and a router with SIDECAR_AUTH=required."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis

from coordinator import ClusterSidecar, Keys, Settings
from coordinator.errors import AuthenticationFailed, PolicyRejected, SidecarTimeout
from coordinator.policy.auth import FRESHNESS_MS, TAG_HEX, Identities, Identity, Signer, canonical, verify
from coordinator.policy.store import PolicyStore
from coordinator.protocol import MAX_STATUS_BYTES
from coordinator.routing.guard import Guard, Mark
from mixin import Message
from ops.report import members_report
from tests.support import TEST_PEER_KEY, P, async_wait_for, request_entry

SECRET = "s3cret-of-peer-a-0123456789abcdef"
OTHER = "s3cret-of-peer-b-fedcba9876543210"
PEER_A = "01AAAAAAAAAAAAAAAAAAAAAAAA"
PEER_B = "01BBBBBBBBBBBBBBBBBBBBBBBB"


def ident(peer: str = PEER_A, secret: str = SECRET, roles: tuple[str, ...] = ("conductor",)) -> Identity:
    return Identity(peer, "a", roles, secret)


def signed(secret: str = SECRET, sender: str = PEER_A, **extra: str) -> dict[str, str]:
    return Signer(secret).sign({"k": "pub", "s": sender, "t": "a.b", "d": '{"x":1}', **extra})


def signed_ms(fields: dict[str, str]) -> int:
    """When ``fields`` were signed (ms), from the nonce (the signer's clock in microseconds)."""
    try:
        return int(fields.get("n", "0")) // 1000
    except ValueError:
        return 0


def reason(fields: dict[str, str], identity: Identity | None = None, entry_ms: int | None = None,
           last_nonce: int = 0) -> str:
    """The AuthenticationFailed message ``verify`` gives for ``fields``."""
    when = signed_ms(fields) if entry_ms is None else entry_ms
    with pytest.raises(AuthenticationFailed) as info:
        verify(ident() if identity is None else identity, fields, when, last_nonce)
    return str(info.value)


# ---------------------------------------------------------------------------------------- verify


def test_good_signature_passes_and_returns_the_nonce() -> None:
    fields = signed()
    assert set(fields) == {"k", "s", "t", "d", "n", "sig"}
    assert len(fields["sig"]) == TAG_HEX == 32  # 128 bits of HMAC-SHA256
    nonce = verify(ident(), fields, signed_ms(fields) + 5, 0)
    assert nonce == int(fields["n"])
    assert verify(ident(), fields, signed_ms(fields), nonce - 1) == nonce


@pytest.mark.parametrize("field", ["k", "s", "t", "d", "n"])
def test_tampered_field_fails_the_signature(field: str) -> None:
    fields = signed()
    fields[field] = fields[field] + "0"
    assert "bad signature" in reason(fields, ident(fields["s"]))


def test_added_or_removed_field_fails_the_signature() -> None:
    added = signed()
    added["f"] = "7"  # e.g. a fence term slipped in after signing
    assert "bad signature" in reason(added)
    removed = signed(r="req-1")
    del removed["r"]
    assert "bad signature" in reason(removed)


def test_wrong_secret_fails_the_signature() -> None:
    assert "bad signature for sender" in reason(signed(secret=OTHER))


def test_forged_sender_fails_the_signature() -> None:
    # A signs an entry that claims to come from B: checked with B's secret, it fails.
    forged = signed(secret=SECRET, sender=PEER_B)
    msg = reason(forged, ident(PEER_B, OTHER))
    assert "bad signature" in msg and PEER_B in msg


def test_missing_signature_fails() -> None:
    fields = signed()
    del fields["sig"]
    assert "unsigned request" in reason(fields)
    plain = {"k": "pub", "s": PEER_A, "t": "a.b", "d": "{}"}
    assert "unsigned request" in reason(plain, entry_ms=0)


def test_unknown_sender_fails() -> None:
    fields = signed()
    with pytest.raises(AuthenticationFailed, match="no identity for sender"):
        verify(None, fields, signed_ms(fields), 0)


@pytest.mark.parametrize("skew", [FRESHNESS_MS + 1, -(FRESHNESS_MS + 1), 10 * FRESHNESS_MS])
def test_stale_timestamp_fails(skew: int) -> None:
    fields = signed()
    ts = signed_ms(fields)
    assert "stale request" in reason(fields, entry_ms=ts + skew)
    assert verify(ident(), fields, ts + (FRESHNESS_MS if skew > 0 else -FRESHNESS_MS), 0)


def test_replayed_nonce_fails() -> None:
    fields = signed()
    nonce = int(fields["n"])
    assert "replayed request" in reason(fields, last_nonce=nonce)
    assert "replayed request" in reason(fields, last_nonce=nonce + 1)


def test_non_numeric_nonce_fails() -> None:
    fields = {"k": "pub", "s": PEER_A, "t": "a.b", "d": "{}", "n": "soon"}
    fields["sig"] = hmac.new(SECRET.encode(), canonical(fields), hashlib.sha256).hexdigest()[:TAG_HEX]
    assert "numeric nonce" in reason(fields, entry_ms=0)


def test_full_length_or_truncated_wrong_tags_fail() -> None:
    fields = signed()
    full = hmac.new(SECRET.encode(), canonical(fields), hashlib.sha256).hexdigest()
    assert full[:TAG_HEX] == fields["sig"]
    assert "bad signature" in reason({**fields, "sig": full})  # only the 128-bit tag is accepted
    assert "bad signature" in reason({**fields, "sig": fields["sig"][:-1]})
    assert "bad signature" in reason({**fields, "sig": "\u00e9" * TAG_HEX})  # not even ASCII


def test_each_failure_has_its_own_reason() -> None:
    good = signed()
    ts = signed_ms(good)
    tampered = {**good, "d": "{}"}
    unsigned = {k: v for k, v in good.items() if k != "sig"}
    reasons = {
        "tampered": reason(tampered),
        "wrong secret": reason(signed(secret=OTHER)),
        "unsigned": reason(unsigned),
        "stale": reason(good, entry_ms=ts + 2 * FRESHNESS_MS),
        "replayed": reason(good, last_nonce=int(good["n"])),
    }
    kinds = {name: next(k for k in ("bad signature", "unsigned", "stale", "replayed") if k in msg)
             for name, msg in reasons.items()}
    assert kinds == {"tampered": "bad signature", "wrong secret": "bad signature",
                     "unsigned": "unsigned", "stale": "stale", "replayed": "replayed"}
    for msg in reasons.values():
        assert SECRET not in msg and OTHER not in msg


def test_signer_nonces_always_grow() -> None:
    signer = Signer(SECRET)
    nonces = [int(signer.sign({"k": "hb", "s": PEER_A})["n"]) for _ in range(2000)]
    assert nonces == sorted(set(nonces))  # strictly increasing even within one microsecond
    last = 0
    for n in nonces:  # so a router accepts every one of them in order
        assert n > last
        last = n


def test_canonical_form_is_unambiguous_and_ignores_the_signature() -> None:
    assert canonical({"ab": "c"}) != canonical({"a": "bc"})
    assert canonical({"a": "1:b"}) != canonical({"a": "1", "b": ""})
    assert canonical({"b": "2", "a": "1"}) == canonical({"a": "1", "b": "2", "sig": "x"})


# ---------------------------------------------------------------------------------------- reprs


def test_no_secret_in_any_repr() -> None:
    signer = Signer(SECRET)
    identity = ident()
    settings = Settings(redis_url="redis://user:hunter2@localhost:6379/0", peer_secret=SECRET,
                        dashboard_user="admin", dashboard_password="dash-pa55word")
    texts = [repr(signer), str(signer), repr(identity), str(identity), repr(settings), str(settings),
             json.dumps(settings.describe()), f"{settings!r} {identity!r} {signer!r}"]
    for text in texts:
        for secret in (SECRET, "dash-pa55word", "hunter2"):
            assert secret not in text, text
    assert "***" in repr(signer)
    assert "peer_id='01AAAAAAAAAAAAAAAAAAAAAAAA'" in repr(identity) and "conductor" in repr(identity)
    described = settings.describe()
    assert described["peer_secret"] == "***" and described["dashboard_password"] == "***"
    assert described["dashboard_user"] == "admin"


# ---------------------------------------------------------------------------------------- identities


def test_identities_add_and_load(client: redis.Redis, keys: Keys) -> None:
    store = Identities(client, keys, TEST_PEER_KEY)
    before = int(client.get(keys.routing_version) or 0)
    out = store.add("conductor-1", ["conductor", "admin"])
    assert set(out) == {"SIDECAR_PEER_ID", "SIDECAR_PEER_SECRET"}
    peer_id, secret = out["SIDECAR_PEER_ID"], out["SIDECAR_PEER_SECRET"]
    assert len(peer_id) == 26 and len(secret) >= 32
    other = store.add("player-1", ["player"])
    assert other["SIDECAR_PEER_SECRET"] != secret and other["SIDECAR_PEER_ID"] != peer_id
    assert int(client.get(keys.routing_version)) == before + 2  # routers reload identities

    client.hset(keys.identities, "01BROKEN", "not json")  # a damaged record is skipped, not fatal
    loaded = store.load()
    assert set(loaded) == {peer_id, other["SIDECAR_PEER_ID"]}
    me = loaded[peer_id]
    assert (me.peer_id, me.name, me.roles, me.secret) == (peer_id, "conductor-1",
                                                          ("conductor", "admin"), secret)
    assert secret not in repr(me) and secret not in repr(loaded)


def test_guard_authenticates_against_identities_in_redis(client: redis.Redis, keys: Keys,
                                                         namespace: str, redis_url: str) -> None:
    settings = Settings(redis_url=redis_url, namespace=namespace, auth="required",
                        peer_key=TEST_PEER_KEY)
    guard = Guard(client, keys, settings)
    guard.refresh(set())
    # created after the guard loaded its identities: it reloads on an unknown sender
    creds = Identities(client, keys, TEST_PEER_KEY).add("late", ["player"])
    peer, signer = creds["SIDECAR_PEER_ID"], Signer(creds["SIDECAR_PEER_SECRET"])
    ids = iter(range(1, 1_000))

    def entry_id(fields: dict[str, str]) -> str:
        return f"{signed_ms(fields)}-{next(ids)}"

    first = signer.sign({"k": "pub", "s": peer, "t": "a", "d": "1"})
    second = signer.sign({"k": "pub", "s": peer, "t": "a", "d": "2"})
    first_id, second_id = entry_id(first), entry_id(second)
    chain: dict[str, Mark] = {}
    assert guard.authenticate(first, first_id, chain) == (int(first["n"]), first_id)
    with pytest.raises(AuthenticationFailed, match="replayed"):  # a copy later in the same run
        guard.authenticate(first, entry_id(first), chain)
    guard.authenticate(second, second_id, chain)
    # the run was not routed (say the script found the routing version stale): authenticating it
    # again from the committed marks accepts the same entries
    guard.authenticate(first, first_id, {})
    guard.commit(chain)
    with pytest.raises(AuthenticationFailed, match="replayed"):
        guard.authenticate(first, entry_id(first))  # an exact copy written again
    stale_id = f"{signed_ms(second) + FRESHNESS_MS + 1000}-0"
    third = signer.sign({"k": "pub", "s": peer, "t": "a", "d": "3"})
    with pytest.raises(AuthenticationFailed, match="stale"):
        guard.authenticate(third, stale_id)
    with pytest.raises(AuthenticationFailed, match="no identity"):
        guard.authenticate(Signer("x").sign({"k": "pub", "s": "01NOBODY", "t": "a", "d": "1"}),
                           entry_id(third))
    # a control request's mark is stored before it takes effect; a guard taking over reads it, so a
    # copy is a replay there too, while the very entry it came from may be processed again
    third_id = entry_id(third)
    mark = guard.authenticate(third, third_id)
    assert mark is not None
    lease = keys.router_lease(0)
    client.set(lease, "tok")
    assert guard.store_mark(peer, mark, lease, "deposed") is False  # fenced by the lease
    assert client.hget(keys.nonces, peer) is None
    assert guard.store_mark(peer, mark, lease, "tok") is True
    assert guard.store_mark(peer, mark, lease, "tok") is True  # the same entry again: not a replay
    with pytest.raises(AuthenticationFailed, match="replayed"):  # another entry, no higher
        guard.store_mark(peer, (mark[0], "1-1"), lease, "tok")
    with pytest.raises(AuthenticationFailed, match="replayed"):
        guard.store_mark(peer, (mark[0] - 5, "1-1"), lease, "tok")
    assert client.hget(keys.nonces, peer) == f"{mark[0]} {third_id}"  # marks never go down
    successor = Guard(client, keys, settings)
    successor.refresh(set())
    with pytest.raises(AuthenticationFailed, match="replayed"):
        successor.authenticate(third, entry_id(third))
    assert successor.authenticate(third, third_id) == mark
    # a guard that is off lets anything through
    off = Guard(client, keys, Settings(redis_url=redis_url, namespace=namespace))
    assert off.authenticate({"k": "pub", "s": "anyone"}, "1-0") is None


# ---------------------------------------------------------------------------------------- a router


def auth_settings(settings: Settings, **extra: Any) -> Settings:
    timings: dict[str, Any] = {"router_lease": 0.6, "heartbeat_interval": 0.3, "member_ttl": 1.5,
                               "request_timeout": 3.0}
    return settings.replace(auth="required", peer_key=TEST_PEER_KEY, **{**timings, **extra})


OPEN_POLICY = {"statements": [
    {"id": "all", "effect": "allow", "role_ids": "*", "action": "*", "resource": ">"}]}


def signed_peer(ids: Identities, st: Settings, name: str, role: str) -> tuple[P, dict[str, str]]:
    """A peer with a fresh identity of ``role``, signing with its secret, and its credentials."""
    creds = ids.add(name, [role])
    return (P(namespace=st.namespace, id=creds["SIDECAR_PEER_ID"], settings=st,
              secret=creds["SIDECAR_PEER_SECRET"]), creds)


@pytest.fixture
async def sidecar(settings: Settings) -> AsyncIterator[ClusterSidecar]:
    sc = ClusterSidecar(settings=auth_settings(settings, enforce_policy=True))
    await sc.setup()
    try:
        yield sc
    finally:
        await sc.teardown()


async def test_signed_peers_talk_and_unsigned_ones_are_refused(
        sidecar: ClusterSidecar, client: redis.Redis, keys: Keys, settings: Settings) -> None:
    PolicyStore(client, keys).set("open", OPEN_POLICY)
    st = auth_settings(settings)
    ids = Identities(client, keys, TEST_PEER_KEY)
    (a, a_creds), (b, b_creds) = signed_peer(ids, st, "a", "conductor"), signed_peer(ids, st, "b", "player")
    async with a, b:
        got: list[Message] = []
        await a.cluster_subscribe("tempo.>", got.append)
        await b.cluster_publish("tempo.set", {"bpm": 120})
        await async_wait_for(lambda: got, what="b's publish at a")
        assert (got[0].sender, got[0].data) == (b.id, {"bpm": 120})
        # heartbeats go through the router when signing (no scripts for peers): membership holds
        joined = float(client.zscore(keys.members, a.id) or 0)
        await async_wait_for(lambda: float(client.zscore(keys.members, a.id) or 0) > joined,
                             what="a heartbeat stamped by the router")

        # an identity nobody runs yet; a request that fails authentication is dead-lettered and
        # gets no answer (anyone may claim any sender: answers would flood the claimed inbox)
        spare = ids.add("c", ["conductor"])["SIDECAR_PEER_ID"]
        quick = st.replace(request_timeout=1.0)
        for label, kwargs in [("no secret", {"id": spare}),
                              ("wrong secret", {"id": spare, "secret": b_creds["SIDECAR_PEER_SECRET"]}),
                              ("no identity", {"secret": "made-up"})]:
            intruder = P(namespace=st.namespace, settings=quick, **kwargs)
            with pytest.raises(SidecarTimeout, match="SIDECAR_PEER_SECRET"):
                await intruder.setup()
            assert intruder._link is None, label  # nothing left running
        assert client.xlen(keys.responses(spare)) == 0

        await b.cluster_publish("tempo.set", {"bpm": 130})  # good traffic is unaffected
        await async_wait_for(lambda: len(got) == 2, what="the second publish")
    # (a peer with no identity has no request stream the router reads: nothing of it is routed)
    dead = [f for _, f in client.xrange(keys.deadletter)]
    assert [f["reason"] for f in dead] == ["unauthenticated"] * 2
    assert ["unsigned request" in dead[0]["message"], "bad signature" in dead[1]["message"]] == [True] * 2
    for f in dead:
        for secret in (a_creds["SIDECAR_PEER_SECRET"], b_creds["SIDECAR_PEER_SECRET"]):
            assert secret not in json.dumps(f)


async def test_identity_roles_win_over_the_role_a_peer_claims(
        sidecar: ClusterSidecar, client: redis.Redis, keys: Keys, settings: Settings) -> None:
    PolicyStore(client, keys).set("conductors", {"statements": [
        {"id": "conductors-talk", "effect": "allow", "role_ids": "conductor", "action": "*",
         "resource": "conductor.>"}]})
    st = auth_settings(settings)
    ids = Identities(client, keys, TEST_PEER_KEY)
    real, liar_creds = ids.add("real", ["conductor"]), ids.add("liar", ["player"])
    conductor = P(namespace=st.namespace, id=real["SIDECAR_PEER_ID"], settings=st,
                  secret=real["SIDECAR_PEER_SECRET"], role="player")
    liar = P(namespace=st.namespace, id=liar_creds["SIDECAR_PEER_ID"], settings=st,
             secret=liar_creds["SIDECAR_PEER_SECRET"], role="conductor")
    async with conductor, liar:
        got: list[Any] = []
        await conductor.cluster_subscribe("conductor.>", lambda m: got.append(m.data))
        with pytest.raises(PolicyRejected, match="no statement allows"):
            await liar.cluster_subscribe("conductor.>", got.append)
        await liar.cluster_publish("conductor.tempo", "from the liar")
        await conductor.cluster_publish("conductor.tempo", "from the conductor")
        await async_wait_for(lambda: got, what="the conductor's own publish")
        await async_wait_for(lambda: client.xlen(keys.deadletter) >= 2, what="the liar's publish refused")
        assert got == ["from the conductor"]
    reasons = {f["reason"] for _, f in client.xrange(keys.deadletter)}
    assert reasons == {"policy_rejected"}


async def test_a_router_taking_over_refuses_replays_of_what_its_predecessor_routed(
        client: redis.Redis, keys: Keys, settings: Settings) -> None:
    PolicyStore(client, keys).set("open", OPEN_POLICY)
    st = auth_settings(settings)
    ids = Identities(client, keys, TEST_PEER_KEY)
    (a, _), (b, _) = signed_peer(ids, st, "a", "player"), signed_peer(ids, st, "b", "player")
    first = ClusterSidecar(settings=st, name="first")
    await first.setup()
    second: ClusterSidecar | None = None
    try:
        async with a, b:
            got: list[Any] = []
            await a.cluster_subscribe("chat.>", lambda m: got.append(m.data))
            captured: dict[str, str] = {}
            while not captured:  # the router's periodic trim may remove an entry before we read it
                mid = await b.cluster_publish("chat.hello", len(got))
                captured = request_entry(client, keys.peer_requests(b.id), mid)
            await async_wait_for(lambda: captured["d"] in map(str, got), what="the captured publish")
            assert client.hget(keys.nonces, b.id) is not None  # stored with the fan-out

            await first.teardown()  # hand over: a new router with nothing in memory
            second = ClusterSidecar(settings=st, name="second")
            await second.setup()
            await async_wait_for(lambda: client.get(keys.router_lease(0)) == second.router.token,
                                 what="the second router's lease")
            before = list(got)
            replay = client.xadd(keys.requests(0), captured)
            await b.cluster_publish("chat.after", "after the takeover")
            await async_wait_for(lambda: "after the takeover" in got, what="good traffic")
            assert got == [*before, "after the takeover"]  # the copy was never delivered
    finally:
        await first.teardown()
        if second is not None:
            await second.teardown()
    dead = {f["entry"]: f for _, f in client.xrange(keys.deadletter)}
    assert dead[replay]["reason"] == "unauthenticated"
    assert "replayed" in dead[replay]["message"]


async def test_made_up_senders_and_an_oversized_batch_neither_flood_nor_stall_anyone(
        client: redis.Redis, keys: Keys, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The router's lease (and the members' TTL) here outlast the CPU a 5 MB batch costs to refuse
    on a loaded machine:
    this test is about floods, not takeovers (a router fenced off between the fan-out that stored
    the senders' marks and the refusal would refuse the batch again, as a replay: the
    takeover tests cover that path)."""
    from coordinator.protocol import MAX_BATCH

    sidecar = ClusterSidecar(settings=auth_settings(settings, enforce_policy=True, router_lease=3.0,
                                                    member_ttl=6.0))
    await sidecar.setup()
    try:
        loads = []
        real_load = Identities.load

        def counted(self: Identities) -> dict[str, Identity]:
            loads.append(1)
            return real_load(self)

        monkeypatch.setattr(Identities, "load", counted)
        PolicyStore(client, keys).set("open", OPEN_POLICY)
        st = auth_settings(settings)
        ids = Identities(client, keys, TEST_PEER_KEY)
        alice, _ = signed_peer(ids, st, "alice", "player")
        bob, bob_creds = signed_peer(ids, st, "bob", "player")
        async with alice, bob:
            got: list[Any] = []
            await alice.cluster_subscribe("chat.>", lambda m: got.append(m.data))
            await bob.cluster_publish("chat.x", -1)
            await async_wait_for(lambda: got == [-1], what="bob's first publish")
            loads.clear()
            pipe = client.pipeline(transaction=False)
            for n in range(1000):  # unsigned, half claiming to be alice, half made-up senders
                sender = alice.id if n % 2 else f"01FAKE{n:020d}"
                pipe.xadd(keys.requests(0), {"k": "pub", "s": sender, "t": "chat.x", "d": "1"})
            # bob's own credentials, signing a batch of 200,000 publishes, on his own request stream
            items = [["chat.x", str(n), None, None, None, None] for n in range(200_000)]
            assert len(items) > MAX_BATCH
            pipe.xadd(keys.peer_requests(bob.id), Signer(bob_creds["SIDECAR_PEER_SECRET"]).sign(
                {"k": "pubs", "s": bob.id, "b": json.dumps(items)}))
            pipe.execute()
            for n in range(20):
                await bob.cluster_publish("chat.x", n)
            await async_wait_for(lambda: len(got) == 21, timeout=20, what="bob's twenty after the attack")
            await async_wait_for(lambda: client.xlen(keys.deadletter) >= 1001, what="every refusal")
        assert got == [-1, *range(20)]  # in order, and nothing of the attack
        assert loads and len(loads) < 100  # not one identity reload per made-up sender
        replies = [f for _, f in client.xrange(keys.responses(alice.id)) if f.get("k") == "reply"]
        assert not [f for f in replies if f.get("ok") == "0"]  # no error answers flooding alice
        reasons = Counter(f["reason"] for _, f in client.xrange(keys.deadletter))
        assert reasons == {"unauthenticated": 1000, "bad_request": 1}
    finally:
        await sidecar.teardown()


async def test_labels_priority_and_eligibility_come_from_the_identity_not_the_peer(
        sidecar: ClusterSidecar, client: redis.Redis, keys: Keys, settings: Settings) -> None:
    PolicyStore(client, keys).set("vault", {"statements": [
        {"id": "listen", "effect": "allow", "role_ids": "*", "action": "subscribe", "resource": ">"},
        {"id": "trusted", "effect": "allow", "role_ids": "*", "action": "publish",
         "resource": "vault.>", "condition": {"labels": {"zone": "trusted"}}}]})
    st = auth_settings(settings)
    ids = Identities(client, keys, TEST_PEER_KEY)
    alice_creds = ids.add("alice", ["player"], labels={"zone": "trusted"}, priority=5)
    bob_creds = ids.add("bob", ["player"])
    carol_creds = ids.add("carol", ["player"], priority=100, eligible=False)
    alice = P(namespace=st.namespace, id=alice_creds["SIDECAR_PEER_ID"], settings=st,
              secret=alice_creds["SIDECAR_PEER_SECRET"])
    bob = P(namespace=st.namespace, id=bob_creds["SIDECAR_PEER_ID"], settings=st,  # claims it all
            secret=bob_creds["SIDECAR_PEER_SECRET"], labels={"zone": "trusted"}, priority=10**9)
    carol = P(namespace=st.namespace, id=carol_creds["SIDECAR_PEER_ID"], settings=st,
              secret=carol_creds["SIDECAR_PEER_SECRET"], leader_eligible=True)
    async with alice, bob, carol:
        got: list[Any] = []
        await alice.cluster_subscribe("vault.>", lambda m: got.append(m.data))
        await bob.cluster_publish("vault.x", "from bob")
        await alice.cluster_publish("vault.x", "from alice")
        await async_wait_for(lambda: got, what="alice's publish")
        await async_wait_for(lambda: client.xlen(keys.deadletter) >= 1, what="bob's publish refused")
        await async_wait_for(lambda: alice.leader_id, what="a leader")
        assert got == ["from alice"]
        assert alice.is_leader and bob.leader_id == alice.id == carol.leader_id
        record = client.hgetall(keys.member(bob.id))
        assert json.loads(record["labels"]) == {}
        assert client.zscore(keys.electorate, bob.id) == 0
        assert client.zscore(keys.electorate, carol.id) is None  # never a candidate
    assert [f["reason"] for _, f in client.xrange(keys.deadletter)] == ["policy_rejected"]


def redis_text(client: redis.Redis) -> str:
    """Every value in ``client``'s Redis, as text (what anyone who can read it would see)."""
    out = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        if kind == "string":
            out.append(str(client.get(key)))
        elif kind == "hash":
            out.append(json.dumps(client.hgetall(key)))
        elif kind == "stream":
            out.append(json.dumps(client.xrange(key)))
        elif kind == "zset":
            out.append(json.dumps(client.zrange(key, 0, -1)))
        elif kind == "set":
            out.append(json.dumps(sorted(client.smembers(key))))
        elif kind == "list":
            out.append(json.dumps(client.lrange(key, 0, -1)))
    return "\n".join(out)


async def test_no_secret_at_rest_and_rotate_and_revoke_take_effect_at_once(
        sidecar: ClusterSidecar, client: redis.Redis, keys: Keys, settings: Settings) -> None:
    from click.testing import CliRunner

    from ops.cli import cli

    PolicyStore(client, keys).set("open", OPEN_POLICY)
    st = auth_settings(settings)
    env = {"SIDECAR_REDIS_URL": st.redis_url or "", "SIDECAR_NAMESPACE": st.namespace,
           "SIDECAR_PEER_KEY": TEST_PEER_KEY}

    def sidecar_cli(*args: str) -> str:
        result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    ids = Identities(client, keys, TEST_PEER_KEY)
    (alice, alice_creds), (bob, bob_creds) = (signed_peer(ids, st, n, "player") for n in ("alice", "bob"))
    async with alice, bob:
        got: list[Any] = []
        await bob.cluster_subscribe("chat.>", lambda m: got.append(m.data))
        await alice.cluster_publish("chat.x", "before")
        await async_wait_for(lambda: got == ["before"], what="alice's first publish")
        # what anyone reading Redis sees holds neither secret, nor the key they derive from
        seen = redis_text(client)
        for secret in (alice_creds["SIDECAR_PEER_SECRET"], bob_creds["SIDECAR_PEER_SECRET"], TEST_PEER_KEY):
            assert secret not in seen

        rotated = dict(line.split("=", 1) for line in sidecar_cli("peer", "rotate", "alice").split())
        assert rotated["SIDECAR_PEER_ID"] == alice.id
        assert rotated["SIDECAR_PEER_SECRET"] != alice_creds["SIDECAR_PEER_SECRET"]
        # alice still signs with her old secret: refused from the router's next look on
        await async_wait_for(lambda: any(f.get("sender") == alice.id and "bad signature" in f["message"]
                                         for _, f in client.xrange(keys.deadletter)),
                             what="alice's old secret refused")
        await alice.cluster_publish("chat.x", "old secret")
        await alice.teardown()  # (the inbox is the id's: one process reads it at a time)
        renewed = P(namespace=st.namespace, settings=st, id=alice.id,
                    secret=rotated["SIDECAR_PEER_SECRET"])
        async with renewed:
            await renewed.cluster_publish("chat.x", "new secret")
            await async_wait_for(lambda: "new secret" in got, what="the new secret's publish")

        out = sidecar_cli("peer", "revoke", bob.id)
        assert out.strip() == f"{bob.id} revoked and evicted"
        assert client.hget(keys.identities, bob.id) is None
        assert client.zscore(keys.members, bob.id) is None
    assert "old secret" not in got
    assert got[:1] == ["before"] and got.count("new secret") == 1


async def test_a_tightened_policy_drops_the_live_subscriptions_it_no_longer_allows(
        sidecar: ClusterSidecar, client: redis.Redis, keys: Keys, settings: Settings) -> None:
    store = PolicyStore(client, keys, inbox_maxlen=settings.inbox_maxlen)
    store.set("open", OPEN_POLICY)
    st = auth_settings(settings)
    ids = Identities(client, keys, TEST_PEER_KEY)
    (alice, _), (bob, _) = signed_peer(ids, st, "alice", "player"), signed_peer(ids, st, "bob", "player")
    dropped: list[tuple[str, str | None, str]] = []
    bob.on_subscription_dropped = lambda p, q, r: dropped.append((p, q, r))  # type: ignore[method-assign]
    async with alice, bob:
        got: list[Any] = []
        await bob.cluster_subscribe("vault.>", lambda m: got.append(m.data))
        await bob.cluster_subscribe("chat.>", lambda m: got.append(m.data))
        await alice.cluster_publish("vault.x", "vault before")
        await async_wait_for(lambda: got == ["vault before"], what="the vault publish")
        store.set("open", {"statements": [
            {"id": "pub", "effect": "allow", "role_ids": "*", "action": "publish", "resource": ">"},
            {"id": "chat", "effect": "allow", "role_ids": "*", "action": "subscribe",
             "resource": "chat.>"}]})
        await async_wait_for(lambda: dropped, what="bob told of the dropped subscription")
        assert client.hexists(keys.subs, f"{bob.id} vault.>") is False
        assert bob.cluster_subscriptions == 1
        await alice.cluster_publish("vault.x", "vault after")
        await alice.cluster_publish("chat.x", "chat after")
        await async_wait_for(lambda: "chat after" in got, what="the chat publish")
    assert got == ["vault before", "chat after"]
    assert [(p, q) for p, q, _ in dropped] == [("vault.>", None)]
    assert "no statement allows" in dropped[0][2]


async def test_a_peer_over_its_rate_waits_its_flood_is_capped_and_others_flow(
        client: redis.Redis, keys: Keys, settings: Settings) -> None:
    from click.testing import CliRunner

    from ops.cli import cli

    st = auth_settings(settings, peer_rate=500.0, peer_burst=100, peer_backlog=1000)
    PolicyStore(client, keys).set("open", OPEN_POLICY)
    ids = Identities(client, keys, TEST_PEER_KEY)
    (alice, _), (carol, _) = signed_peer(ids, st, "alice", "player"), signed_peer(ids, st, "carol", "player")
    bob = ids.add("bob", ["player"])["SIDECAR_PEER_ID"]
    sc = ClusterSidecar(settings=st)
    await sc.setup()
    try:
        async with alice, carol:
            got: list[Any] = []
            await carol.cluster_subscribe("chat.>", lambda m: got.append(m.data))
            pipe = client.pipeline(transaction=False)
            for n in range(20_000):  # bob floods his own stream (unsigned: refused, but read)
                pipe.xadd(keys.peer_requests(bob), {"k": "pub", "s": bob, "t": "chat.x", "d": str(n)})
            pipe.execute()
            for n in range(20):
                await alice.cluster_publish("chat.x", n)
            await async_wait_for(lambda: len(got) == 20, timeout=20, what="alice's twenty")

            def status() -> dict[str, Any]:
                env = {"SIDECAR_REDIS_URL": st.redis_url or "", "SIDECAR_NAMESPACE": st.namespace}
                return dict(json.loads(CliRunner().invoke(cli, ["status", "--json"], env=env).output))

            await async_wait_for(lambda: bob in status()["throttled"], what="bob shown throttled")
            await async_wait_for(lambda: status()["dropped_requests"] > 0, timeout=20,
                                 what="bob's flood capped")
            assert client.xlen(keys.peer_requests(bob)) <= 1000 + st.batch_size
            assert alice.id not in status()["throttled"]
    finally:
        await sc.teardown()
    assert got == list(range(20))


async def test_what_a_peer_says_of_itself_is_kept_only_as_a_bounded_json_object(
        sidecar: ClusterSidecar, client: redis.Redis, keys: Keys, settings: Settings) -> None:
    """A signed peer's heartbeat payload and status fields reach every operator's screen: the
    router keeps them only as a JSON object of bounded size, without NaN (which browsers refuse)."""
    st = auth_settings(settings)
    mallory, _ = signed_peer(Identities(client, keys, TEST_PEER_KEY), st, "mallory", "player")
    async with mallory:
        link = mallory._require_link()
        await link.request("hb", x='{"load": 1}', st='{"ok": true}')
        # (mallory's own heartbeats go on meanwhile: they keep the payload and send real status)
        assert client.hget(keys.member(mallory.id), "extra") == '{"load": 1}'
        for hostile in ('{"a": NaN}', '{"a": Infinity}', "[1, 2]", '"text"', "{broken",
                        json.dumps({"pad": "x" * MAX_STATUS_BYTES})):
            await link.request("hb", x=hostile, st=hostile)
            extra, status = client.hmget(keys.member(mallory.id), "extra", "status")
            assert extra == '{"load": 1}' and status != hostile, hostile  # never stored
            assert json.loads(status, parse_constant=lambda c: pytest.fail(f"{c} stored"))
        row = next(m for m in members_report(client, keys) if m["id"] == mallory.id)
        assert row["extra"] == {"load": 1} and isinstance(row["status"], dict) and row["status"]
