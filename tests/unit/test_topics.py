"""Topic grammar and the subscription index, checked against the brute-force reference matcher."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.errors import InvalidTopic
from coordinator.topics import (
    MAX_TOPIC_LENGTH,
    SubscriptionIndex,
    check_pattern,
    check_publish_topic,
    matches,
)

# ---------------------------------------------------------------------------------------- grammar


@pytest.mark.parametrize("pattern", ["a", "a.b.c", "*", ">", "a.*", "*.b", "a.>", "*.*.>",
                                     "cluster.member.joined", "cluster.>", "a-b_c.D9"])
def test_valid_patterns_are_returned_unchanged(pattern: str) -> None:
    assert check_pattern(pattern) == pattern


@pytest.mark.parametrize("pattern", ["", ".", "a.", ".a", "a..b", "a.b."])
def test_pattern_with_empty_token_is_refused(pattern: str) -> None:
    with pytest.raises(InvalidTopic, match=r"empty|non-empty"):
        check_pattern(pattern)


@pytest.mark.parametrize("bad", [" ", "\t", "\n", "\r", "\x00"])
def test_whitespace_and_nul_are_refused(bad: str) -> None:
    with pytest.raises(InvalidTopic, match="whitespace"):
        check_pattern(f"a{bad}b.c")
    with pytest.raises(InvalidTopic, match="whitespace"):
        check_publish_topic(f"a.b{bad}c")


# Regression (fixed) (coordinator/topics.py, _FORBIDDEN): only " \t\r\n\x00" are refused, so other
# whitespace (vertical tab, form feed, NBSP, ...) slips into topics although the grammar says
# "tokens without whitespace". This test fails until _tokens() also rejects ch.isspace().
@pytest.mark.parametrize("bad", ["\v", "\f", "\u00a0", "\u2003"])
def test_every_kind_of_whitespace_is_refused(bad: str) -> None:
    with pytest.raises(InvalidTopic):
        check_publish_topic(f"a{bad}b")


@pytest.mark.parametrize("pattern", [">.a", "a.>.b", ">.>", "a.>.>"])
def test_full_wildcard_must_be_last(pattern: str) -> None:
    with pytest.raises(InvalidTopic, match="last token"):
        check_pattern(pattern)


@pytest.mark.parametrize("pattern", ["a*", "*a", "a.b*", "a>.b", "a.>b", "**", "*>"])
def test_partial_wildcards_are_refused(pattern: str) -> None:
    with pytest.raises(InvalidTopic, match="whole tokens"):
        check_pattern(pattern)


@pytest.mark.parametrize("value", [None, 3, b"a.b", ["a"]])
def test_non_strings_are_refused(value: object) -> None:
    with pytest.raises(InvalidTopic, match="non-empty string"):
        check_pattern(value)
    with pytest.raises(InvalidTopic, match="non-empty string"):
        check_publish_topic(value)


@pytest.mark.parametrize("topic", ["a.*", "*", ">", "a.>", "a*", "a.b>c"])
def test_wildcard_publish_is_refused(topic: str) -> None:
    with pytest.raises(InvalidTopic, match="wildcard"):
        check_publish_topic(topic)


def test_literal_publish_is_accepted() -> None:
    assert check_publish_topic("sensors.kitchen.temp") == "sensors.kitchen.temp"
    assert check_publish_topic("clusters.x") == "clusters.x"  # only the 'cluster.' prefix is reserved


@pytest.mark.parametrize("topic", ["cluster.member.joined", "cluster.leader", "cluster.x.y"])
def test_reserved_topics_need_allow_reserved(topic: str) -> None:
    with pytest.raises(InvalidTopic, match="sidecar's own events"):
        check_publish_topic(topic)
    assert check_publish_topic(topic, allow_reserved=True) == topic
    assert check_pattern(topic) == topic  # subscribing to them is fine


def test_length_limit() -> None:
    at_limit = "a." * ((MAX_TOPIC_LENGTH - 2) // 2) + "bc"
    assert len(at_limit) == MAX_TOPIC_LENGTH
    assert check_publish_topic(at_limit) == at_limit
    assert check_pattern(at_limit) == at_limit
    too_long = at_limit + "y"
    with pytest.raises(InvalidTopic, match=str(MAX_TOPIC_LENGTH)):
        check_publish_topic(too_long)
    with pytest.raises(InvalidTopic, match=str(MAX_TOPIC_LENGTH)):
        check_pattern(too_long)


def test_invalid_topic_is_a_value_error_with_a_code() -> None:
    with pytest.raises(ValueError) as info:
        check_publish_topic("a..b")
    assert isinstance(info.value, InvalidTopic)
    assert info.value.code == "invalid_topic"


# ------------------------------------------------------------------------------ reference matcher


@pytest.mark.parametrize(("pattern", "topic", "expected"), [
    ("a.b", "a.b", True), ("a.b", "a.c", False), ("a.b", "a.b.c", False), ("a.b.c", "a.b", False),
    ("a.*", "a.b", True), ("a.*", "a", False), ("a.*", "a.b.c", False), ("*.b", "x.b", True),
    ("a.>", "a.b", True), ("a.>", "a.b.c.d", True), ("a.>", "a", False), (">", "a", True),
    ("*.>", "a", False), ("*.>", "a.b", True), ("*", "a.b", False),
])
def test_reference_matcher(pattern: str, topic: str, expected: bool) -> None:
    assert matches(pattern, topic) is expected


# ---------------------------------------------------------------------------- index vs reference

TOKENS = st.sampled_from(["a", "b", "c", "dd"])
LITERAL = st.lists(TOKENS, min_size=1, max_size=5).map(".".join)
PATTERN = st.builds(
    lambda body, tail: ".".join(body + tail),
    st.lists(st.one_of(TOKENS, st.just("*")), min_size=0, max_size=4),
    st.sampled_from([[], [">"], ["*"], ["a"]]),
).filter(bool)
PEERS = st.sampled_from(["p1", "p2", "p3", "p4"])


def brute_force(subs: set[tuple[str, str]], topic: str) -> set[str]:
    return {peer for peer, pattern in subs if matches(pattern, topic)}


@settings(max_examples=300, deadline=None)
@given(subs=st.sets(st.tuples(PEERS, PATTERN), max_size=25), topics=st.lists(LITERAL, min_size=1,
                                                                             max_size=10))
def test_index_matches_like_reference(subs: set[tuple[str, str]], topics: list[str]) -> None:
    index = SubscriptionIndex(subs)
    assert len(index) == len(subs)
    assert set(index.items()) == subs
    for topic in topics:
        assert index.match(topic) == brute_force(subs, topic)


OPS = st.lists(st.tuples(st.sampled_from(["add", "remove", "remove_peer"]), PEERS, PATTERN),
               max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops=OPS, topics=st.lists(LITERAL, min_size=1, max_size=8))
def test_index_tracks_add_remove_sequences(ops: list[tuple[str, str, str]],
                                           topics: list[str]) -> None:
    index = SubscriptionIndex()
    model: set[tuple[str, str]] = set()
    for op, peer, pattern in ops:
        if op == "add":
            assert index.add(peer, pattern) is ((peer, pattern) not in model)
            model.add((peer, pattern))
        elif op == "remove":
            assert index.remove(peer, pattern) is ((peer, pattern) in model)
            model.discard((peer, pattern))
        else:
            mine = {s for s in model if s[0] == peer}
            assert index.remove_peer(peer) == len(mine)
            model -= mine
        assert ((peer, pattern) in index) is ((peer, pattern) in model)
    assert set(index.items()) == model
    assert len(index) == len(model)
    for topic in topics:
        assert index.match(topic) == brute_force(model, topic)


def test_index_prunes_to_empty_after_removing_everything() -> None:
    index = SubscriptionIndex([("p", "a.b.c"), ("p", "a.*.>"), ("q", "*"), ("q", ">")])
    assert index.remove_peer("p") == 2
    assert index.remove_peer("q") == 2
    assert index.remove_peer("q") == 0
    assert len(index) == 0
    assert index._root.empty()  # no dead branches left behind
    assert index.match("a.b.c") == set()


def test_patterns_of() -> None:
    index = SubscriptionIndex([("p", "a.b"), ("p", "a.>"), ("q", "a.b")])
    assert index.patterns_of("p") == frozenset({"a.b", "a.>"})
    assert index.patterns_of("nobody") == frozenset()


def test_match_does_not_depend_on_unrelated_subscriptions() -> None:
    relevant = [("s1", "orders.*.created"), ("s2", "orders.>"), ("s3", "*.eu.created"),
                ("s4", "orders.eu.created"), ("s5", "orders.us.created")]
    topics = ["orders.eu.created", "orders.us.created", "orders.eu", "billing.eu.created", "x"]
    small = SubscriptionIndex(relevant + [(f"n{i}", f"noise.{i}.x") for i in range(5)])
    big = SubscriptionIndex(relevant + [(f"n{i}", f"noise{i}.t{i % 97}.>") for i in range(10_000)])
    assert len(big) == 10_005
    for topic in topics:
        assert big.match(topic) == small.match(topic) == brute_force(set(relevant), topic)
    assert big.match("noise17.t17.z") == {"n17"}
