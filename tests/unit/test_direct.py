"""The direct data path's client side: candidate patterns, routes from the index, packed calls."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from coordinator.keys import Keys
from coordinator.resp import pack
from coordinator.routing.direct import (
    DataPlane,
    DirectBatch,
    Route,
    RouteCache,
    candidates,
    template_key,
)
from coordinator.settings import Settings
from coordinator.topics import matches
from tests.unit.test_topics import LITERAL, PATTERN, PEERS

SHA = "a" * 40


@given(topic=LITERAL, pattern=PATTERN)
def test_candidates_hold_exactly_the_patterns_that_match(topic: str, pattern: str) -> None:
    # every pattern that matches the topic is a candidate, and every candidate matches it
    assert (pattern in candidates(topic)) == matches(pattern, topic)


def test_candidates_grow_with_depth_only() -> None:
    assert candidates("a") == [">", "a", "*"]
    assert sorted(candidates("a.b")) == sorted([">", "a.>", "*.>", "a.b", "a.*", "*.b", "*.*"])
    assert len(candidates("a.b.c.d.e")) == 2 ** 6 - 1


@given(subs=st.sets(st.tuples(PEERS, PATTERN, st.sampled_from(["", "q1", "q2"])), max_size=20),
       topic=LITERAL)
def test_a_route_from_the_index_is_what_the_subscriptions_say(
        subs: set[tuple[str, str, str]], topic: str) -> None:
    index: dict[str, list[str]] = {}  # what subscribe.lua keeps: pattern -> "<peer>[ <queue>]"
    for peer, pattern, queue in sorted(subs):
        index.setdefault(pattern, []).append(f"{peer} {queue}" if queue else peer)
    patterns = candidates(topic)
    route = Route.from_index(patterns, ["\n".join(index[p]) if p in index else None for p in patterns])
    assert set(route.plain) == {p for p, pat, q in subs if not q and matches(pat, topic)}
    groups = {(q, pat): {p for p, pt, qq in subs if qq == q and pt == pat}
              for _, pat, q in subs if q and matches(pat, topic)}
    assert {(q, pat): set(m) for q, pat, m in route.groups} == groups


def _cache(topic: str, *, groups: bool = False) -> RouteCache:
    cache = RouteCache()
    values: list[str | None] = [None] * len(candidates(topic))
    values[candidates(topic).index(topic)] = "sub1\nsub2 workers" if groups else "sub1\nsub2"
    cache.learn([topic], ["7", [], values])
    return cache


def _plane() -> DataPlane:
    return DataPlane.from_settings(Settings(redis_url="redis://127.0.0.1:1"))


def test_a_lone_plain_publish_reuses_its_packed_template() -> None:
    cache = _cache("a.b")
    for n in range(3):
        f = {"k": "pub", "s": "me", "t": "a.b", "d": f'{{"n": {n}}}', "i": f"ID{n}"}
        batch = DirectBatch(Keys("ns"), _plane(), "me", [f])
        assert batch.packed(SHA, cache) == pack([batch.command(SHA, cache)])
    assert list(cache.templates) == [("pub", "a.b")]
    cache.learn(["a.b"], ["8", [], [None] * 7])  # the version moved: templates go with the routes
    assert cache.templates == {}


def test_a_template_does_not_mistake_a_peer_named_msg_for_the_message() -> None:
    cache = RouteCache()
    values: list[str | None] = [None] * 7
    values[candidates("a.b").index("a.b")] = "msg"
    cache.learn(["a.b"], ["7", [], values])
    f = {"k": "pub", "s": "msg", "t": "a.b", "d": "1", "i": "ID1"}
    batch = DirectBatch(Keys("ns"), _plane(), "msg", [f])
    assert batch.packed(SHA, cache) == pack([batch.command(SHA, cache)])
    f2 = {**f, "d": "2", "i": "ID2"}
    second = DirectBatch(Keys("ns"), _plane(), "msg", [f2])
    assert second.packed(SHA, cache) == pack([second.command(SHA, cache)])


def test_group_publishes_requests_and_answers_reuse_templates_too() -> None:
    cache = _cache("a.b", groups=True)
    for n in range(3):
        entries = [
            {"k": "pub", "s": "me", "t": "a.b", "d": f"{n}", "i": f"ID{n}"},
            {"k": "pub", "s": "me", "t": "a.b", "d": f"{n}", "i": f"RQ{n}", "rt": "me"},
            {"k": "rep", "s": "me", "to": "you", "ri": f"RQ{n}", "ok": "1", "d": f"[{n}]"},
            {"k": "rep", "s": "me", "to": "you", "ri": f"RQ{n}", "ok": "0", "e": f"boom {n}"},
        ]
        for f in entries:
            batch = DirectBatch(Keys("ns"), _plane(), "me", [f])
            assert batch.packed(SHA, cache) == pack([batch.command(SHA, cache)])
    assert sorted(cache.templates) == [("pub", "a.b"), ("rep", "you", "0"), ("rep", "you", "1"),
                                       ("req", "a.b")]
    group = DirectBatch(Keys("ns"), _plane(), "me", [entries[0]])
    assert group.batch_key(cache) == "ID2"  # a group delivery: a resent batch must be recognised


def test_calls_with_fences_expiry_headers_or_several_entries_are_packed_whole() -> None:
    plain = _cache("a.b")
    f = {"k": "pub", "s": "me", "t": "a.b", "d": "1", "i": "ID1"}
    for odd in ({**f, "f": "3"}, {**f, "x": "1000"}, {**f, "h": '{"a": "b"}'}):
        batch = DirectBatch(Keys("ns"), _plane(), "me", [odd])
        assert batch.packed(SHA, plain) == pack([batch.command(SHA, plain)])
        assert template_key(odd) is None
    several = DirectBatch(Keys("ns"), _plane(), "me", [f, {**f, "i": "ID2"}])
    assert several.packed(SHA, plain) == pack([several.command(SHA, plain)])
    assert plain.templates == {} and several.batch_key(plain) == ""


def test_data_plane_is_direct_only_without_the_routers_checks() -> None:
    base = Settings(redis_url="redis://127.0.0.1:1")
    assert DataPlane.from_settings(base).direct
    assert not DataPlane.from_settings(base.replace(auth="required")).direct
    assert not DataPlane.from_settings(base.replace(enforce_policy=True)).direct
    assert not DataPlane.from_settings(base.replace(data_path="routed")).direct
    plane = DataPlane.from_settings(base)
    assert DataPlane.parse(plane.fields()) == plane
    assert DataPlane.parse({}) is None
    assert DataPlane.parse({**plane.fields(), "mode": "sideways"}) is None


def test_a_new_data_plane_packs_its_templates_afresh() -> None:
    from mixin.outbox import Outbox

    outbox = Outbox(None, "stream", limit=10, signer=None, on_state=lambda up: None)
    outbox.plane = _plane()
    outbox.routes = _cache("a.b")
    f = {"k": "pub", "s": "me", "t": "a.b", "d": "1", "i": "ID1"}
    DirectBatch(Keys("ns"), _plane(), "me", [f]).packed(SHA, outbox.routes)
    outbox.plane = _plane()  # the same limits: the packed calls still hold
    assert list(outbox.routes.templates) == [("pub", "a.b")]
    smaller = DataPlane.from_settings(Settings(redis_url="redis://127.0.0.1:1", inbox_maxlen=10))
    outbox.plane = smaller  # a router with other limits: calls packed with the old ones go
    assert outbox.routes.templates == {}
