"""Policy documents: validation (errors name the field), evaluation, and ``covers`` for subscriptions."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from coordinator.errors import InvalidPolicy, InvalidTopic
from coordinator.policy.engine import Decision, PolicyEngine, covers, parse_policy
from coordinator.topics import check_pattern, matches


def statement(**overrides: Any) -> dict[str, Any]:
    """A valid statement, with ``overrides`` applied (None removes a field)."""
    st: dict[str, Any] = {"id": "s1", "effect": "allow", "role_ids": ["conductor"],
                          "action": ["publish"], "resource": ["conductor.>"]}
    st.update(overrides)
    return {k: v for k, v in st.items() if v is not None}


def document(*statements: dict[str, Any], name: str = "p", **extra: Any) -> dict[str, Any]:
    return {"name": name, "statements": list(statements or [statement()]), **extra}


def engine(*statements: dict[str, Any]) -> PolicyEngine:
    return PolicyEngine([parse_policy(document(*statements))])


CONDUCTOR = frozenset({"conductor"})
PLAYER = frozenset({"player"})

# ---------------------------------------------------------------------------------------- parsing


def test_valid_document_is_parsed_into_statements() -> None:
    policy = parse_policy(document(
        statement(id="tempo", action="*", resource="conductor.tempo", role_ids="conductor",
                  condition={"labels": {"zone": "a"}}),
        statement(id="quiet", effect="deny", action=["publish", "subscribe"], role_ids=["*"],
                  resource=["a.*", "b.>"]),
        data={"tempo": 120}))
    assert policy.name == "p"
    assert [s.id for s in policy.statements] == ["tempo", "quiet"]
    tempo, quiet = policy.statements
    assert tempo.actions == frozenset({"*"}) and tempo.resources == ("conductor.tempo",)
    assert tempo.role_ids == frozenset({"conductor"})
    assert tempo.condition == {"labels": {"zone": "a"}}
    assert quiet.effect == "deny" and quiet.actions == frozenset({"publish", "subscribe"})
    assert quiet.resources == ("a.*", "b.>")
    assert policy.data == {"tempo": 120}
    assert policy.document["data"] == {"tempo": 120}  # what peers receive


@pytest.mark.parametrize(("overrides", "field", "detail"), [
    ({"effect": "maybe"}, "statements[0].effect", "maybe"),
    ({"effect": None}, "statements[0].effect", "None"),
    ({"action": "read"}, "statements[0].action", "read"),
    ({"action": ["publish", "delete"]}, "statements[0].action", "delete"),
    ({"action": []}, "statements[0].action", "non-empty"),
    ({"resource": "a.>.b"}, "statements[0].resource", "last token"),
    ({"resource": "a..b"}, "statements[0].resource", "empty token"),
    ({"resource": "a.b*"}, "statements[0].resource", "whole tokens"),
    ({"resource": ["a", 5]}, "statements[0].resource", "5"),
    ({"resource": None}, "statements[0].resource", "None"),
    ({"role_ids": []}, "statements[0].role_ids", "non-empty"),
    ({"colour": "red"}, "statements[0]", "unknown fields: colour"),
    ({"condition": {"time": "now"}}, "statements[0].condition", "labels"),
    ({"condition": {"labels": "zone=a"}}, "statements[0].condition", "labels"),
    ({"id": 7}, "statements[0].id", "7"),
])
def test_invalid_statement_is_refused_naming_the_field(overrides: dict[str, Any], field: str,
                                                        detail: str) -> None:
    with pytest.raises(InvalidPolicy) as info:
        parse_policy(document(statement(**overrides)))
    message = str(info.value)
    assert message.startswith(field), message
    assert detail in message, message


def test_duplicate_statement_id_is_refused_naming_the_second() -> None:
    with pytest.raises(InvalidPolicy, match=r"statements\[1\]\.id .*'same'"):
        parse_policy(document(statement(id="same"), statement(id="same", effect="deny")))


def test_explicit_id_colliding_with_a_default_id_is_refused() -> None:
    with pytest.raises(InvalidPolicy, match=r"statements\[1\]\.id"):
        parse_policy(document(statement(id=None), statement(id="statement-0")))


@pytest.mark.parametrize(("doc", "field"), [
    ({"name": "p"}, "statements"),
    ({"name": "p", "statements": {"id": "x"}}, "statements"),
    ({"name": "p", "statements": ["allow everything"]}, r"statements\[0\]"),
    ({"name": "bad name!", "statements": []}, "name"),
    ({"statements": []}, "name"),
    ({"name": "p", "statements": [], "data": [1, 2]}, "data"),
])
def test_invalid_document_is_refused_naming_the_field(doc: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidPolicy, match=rf"^{field}"):
        parse_policy(doc)


def test_non_string_label_condition_is_refused() -> None:
    # Regression (fixed) (coordinator/policy.py, parse_policy, the condition check): the error message
    # promises "labels: a mapping of strings" but the values are never checked. YAML turns
    # `zone: 1` into the int 1, and since peer labels are always strings such a statement can
    # never match: a condition the operator wrote is silently dead. It must be refused.
    with pytest.raises(InvalidPolicy, match=r"statements\[0\]\.condition"):
        parse_policy(document(statement(condition={"labels": {"zone": 1}})))


def test_the_given_name_wins_over_the_documents_own() -> None:
    assert parse_policy(document(name="inside"), name="outside").name == "outside"
    assert parse_policy(document(name="inside"), name="outside").document["name"] == "outside"


YAML_TEXT = """
name: conductors
statements:
  - id: tempo-control
    effect: allow
    role_ids: [conductor, "*"]
    action: [publish, subscribe]
    resource: ["conductor.>"]
    condition: {labels: {zone: a}}
data:
  tempo: 120
"""


def test_yaml_and_json_text_are_both_accepted_and_equal() -> None:
    from_yaml = parse_policy(YAML_TEXT)
    from_json = parse_policy(json.dumps(from_yaml.document))
    assert from_yaml == from_json
    st = from_yaml.statements[0]
    assert (st.id, st.effect, st.role_ids, st.actions, st.resources) == (
        "tempo-control", "allow", frozenset({"conductor", "*"}), frozenset({"publish", "subscribe"}),
        ("conductor.>",))
    assert from_yaml.data == {"tempo": 120}


@pytest.mark.parametrize("text", ["name: [unclosed", "{\"name\": ", "just words", "- a\n- b"])
def test_text_that_is_not_a_policy_document_is_refused(text: str) -> None:
    with pytest.raises(InvalidPolicy):
        parse_policy(text)


# ---------------------------------------------------------------------------------------- evaluation


def test_matching_allow_allows_and_names_the_statement() -> None:
    decision = engine(statement(id="tempo")).evaluate(CONDUCTOR, "publish", "conductor.tempo")
    assert decision == Decision(True, "allowed by p/tempo", "tempo")


def test_no_matching_statement_denies() -> None:
    e = engine(statement(id="tempo"))
    for roles, action, topic in [(CONDUCTOR, "publish", "player.note"),  # resource
                                 (CONDUCTOR, "subscribe", "conductor.tempo"),  # action
                                 (PLAYER, "publish", "conductor.tempo")]:  # role
        decision = e.evaluate(roles, action, topic)
        assert not decision.allowed
        assert decision.statement is None
        assert "no statement allows" in decision.reason


def test_empty_engine_denies_everything() -> None:
    assert not PolicyEngine().evaluate(CONDUCTOR, "publish", "a").allowed


def test_matching_deny_wins_over_allow_in_any_order_and_across_documents() -> None:
    allow = statement(id="all", resource=">", action="*")
    deny = statement(id="no-secret", effect="deny", resource="conductor.secret")
    for order in ([allow, deny], [deny, allow]):
        decision = engine(*order).evaluate(CONDUCTOR, "publish", "conductor.secret")
        assert not decision.allowed
        assert decision.statement == "no-secret"
        assert "'no-secret'" in decision.reason and "'p'" in decision.reason
        assert engine(*order).evaluate(CONDUCTOR, "publish", "conductor.tempo").allowed
    two_docs = PolicyEngine([parse_policy(document(allow, name="open")),
                             parse_policy(document(deny, name="closed"))])
    decision = two_docs.evaluate(CONDUCTOR, "publish", "conductor.secret")
    assert not decision.allowed and "'closed'" in decision.reason


def test_deny_touching_part_of_a_subscription_denies_it() -> None:
    # An allow must cover the whole pattern, but a deny wins as soon as it touches any topic the
    # pattern could receive: otherwise subscribing wider reaches around it.
    e = engine(statement(id="listen", action="subscribe", resource="conductor.>"),
               statement(id="no-secret", effect="deny", action="subscribe", resource="conductor.secret"))
    for pattern in ("conductor.>", "conductor.*", "conductor.secret", "*.secret", ">"):
        decision = e.evaluate(CONDUCTOR, "subscribe", pattern)
        assert not decision.allowed, pattern
        if pattern != ">":  # '>' is not inside the allow either
            assert decision.statement == "no-secret", pattern
    for pattern in ("conductor.tempo", "conductor.tempo.>", "conductor.*.x"):
        assert e.evaluate(CONDUCTOR, "subscribe", pattern).allowed, pattern


def test_deny_that_does_not_match_leaves_the_allow() -> None:
    e = engine(statement(id="ok", resource="conductor.>"),
               statement(id="no-players", effect="deny", role_ids="player", resource=">"))
    assert e.evaluate(CONDUCTOR, "publish", "conductor.tempo").allowed
    assert not e.evaluate(PLAYER, "publish", "conductor.tempo").allowed


def test_role_star_matches_any_role_even_none() -> None:
    e = engine(statement(role_ids="*"))
    for roles in (CONDUCTOR, PLAYER, frozenset({"x", "y"}), frozenset()):
        assert e.evaluate(roles, "publish", "conductor.tempo").allowed


def test_any_of_several_roles_matches() -> None:
    e = engine(statement(role_ids=["player"]))
    assert e.evaluate(frozenset({"listener", "player"}), "publish", "conductor.tempo").allowed


def test_unknown_role_is_denied() -> None:
    e = engine(statement(role_ids=["conductor", "player"], action="*", resource=">"))
    decision = e.evaluate(frozenset({"intruder"}), "publish", "conductor.tempo")
    assert not decision.allowed and "intruder" in decision.reason
    assert not e.evaluate(frozenset(), "subscribe", "conductor.tempo").allowed


def test_action_star_covers_publish_and_subscribe() -> None:
    e = engine(statement(action="*"))
    assert e.evaluate(CONDUCTOR, "publish", "conductor.tempo").allowed
    assert e.evaluate(CONDUCTOR, "subscribe", "conductor.>").allowed
    only_pub = engine(statement(action="publish"))
    assert not only_pub.evaluate(CONDUCTOR, "subscribe", "conductor.tempo").allowed


@pytest.mark.parametrize(("resource", "topic", "allowed"), [
    ("conductor.*", "conductor.tempo", True),
    ("conductor.*", "conductor.tempo.fast", False),
    ("conductor.*", "conductor", False),
    ("conductor.>", "conductor.tempo.fast", True),
    ("conductor.>", "conductor", False),
    ("*.tempo", "band.tempo", True),
    ("*.tempo", "band.volume", False),
    (">", "anything.at.all", True),
    ("conductor.tempo", "conductor.tempo", True),
    ("conductor.tempo", "conductor.tempos", False),
])
def test_wildcard_resources_for_publish(resource: str, topic: str, allowed: bool) -> None:
    assert engine(statement(resource=resource)).evaluate(CONDUCTOR, "publish", topic).allowed is allowed


@pytest.mark.parametrize(("resource", "pattern", "allowed"), [
    ("a.>", "a.*", True),
    ("a.>", "a.b.c", True),
    ("a.>", "a.>", True),
    ("a.>", "a.*.>", True),
    ("a.*", "a.>", False),
    ("a.*", "a.*", True),
    ("a.*", "a.b", True),
    ("a.*", "a.b.c", False),
    ("a.b", "a.*", False),
    ("a.>", "a", False),
    (">", ">", True),
    ("*.b", "*.>", False),
])
def test_subscribe_needs_the_whole_pattern_inside_the_resource(resource: str, pattern: str,
                                                               allowed: bool) -> None:
    assert covers(resource, pattern) is allowed
    e = engine(statement(action="subscribe", resource=resource))
    assert e.evaluate(CONDUCTOR, "subscribe", pattern).allowed is allowed


def _patterns(tokens: str, depth: int) -> list[str]:
    out = []
    for n in range(1, depth + 1):
        for combo in itertools.product(tokens, repeat=n):
            text = ".".join(combo)
            try:
                out.append(check_pattern(text))
            except InvalidTopic:
                continue
    return out


def test_covers_agrees_with_the_reference_matcher_exhaustively() -> None:
    """covers(r, p) iff every topic matching p matches r (topics use a token no pattern has)."""
    patterns = _patterns("ab*>", 3)
    topics = [".".join(c) for n in range(1, 5) for c in itertools.product("abc", repeat=n)]
    matched = {p: [t for t in topics if matches(p, t)] for p in patterns}
    for r in patterns:
        for p in patterns:
            expected = all(matches(r, t) for t in matched[p])
            assert covers(r, p) is expected, (r, p)


def test_label_condition_must_be_met() -> None:
    e = engine(statement(id="zone-a", condition={"labels": {"zone": "a", "tier": "gold"}}))
    ok = e.evaluate(CONDUCTOR, "publish", "conductor.tempo", {"zone": "a", "tier": "gold", "x": "y"})
    assert ok.allowed and ok.statement == "zone-a"
    for labels in ({"zone": "b", "tier": "gold"}, {"zone": "a"}, {}, None):
        assert not e.evaluate(CONDUCTOR, "publish", "conductor.tempo", labels).allowed


def test_label_condition_on_a_deny_only_denies_those_labels() -> None:
    e = engine(statement(id="all", resource=">"),
               statement(id="no-zone-b", effect="deny", resource=">", condition={"labels": {"zone": "b"}}))
    assert e.evaluate(CONDUCTOR, "publish", "x", {"zone": "a"}).allowed
    denied = e.evaluate(CONDUCTOR, "publish", "x", {"zone": "b"})
    assert not denied.allowed and denied.statement == "no-zone-b"


def test_cached_decisions_stay_per_request_shape() -> None:
    e = engine(statement(id="zone-a", condition={"labels": {"zone": "a"}}))
    for _ in range(3):  # a cached answer for one shape never leaks into another
        assert e.evaluate(CONDUCTOR, "publish", "conductor.x", {"zone": "a"}).allowed
        assert not e.evaluate(CONDUCTOR, "publish", "conductor.x", {"zone": "b"}).allowed
        assert not e.evaluate(PLAYER, "publish", "conductor.x", {"zone": "a"}).allowed
        assert not e.evaluate(CONDUCTOR, "subscribe", "conductor.x", {"zone": "a"}).allowed


def test_the_readme_policy_example_allows_what_it_means_to() -> None:
    import re
    from pathlib import Path

    readme = Path(__file__).resolve().parents[2].joinpath("README.md").read_text()
    block = re.search(r"```yaml\n(name: conductors\n.*?)```", readme, re.S)
    assert block is not None, "the README's policy example is gone"
    engine = PolicyEngine([parse_policy(block.group(1))])
    assert engine.evaluate(frozenset({"follower"}), "subscribe", "conductor.>").allowed
    assert engine.evaluate(frozenset({"conductor"}), "publish", "conductor.set_tempo").allowed
    assert not engine.evaluate(frozenset({"conductor"}), "publish", "conductor.secret").allowed
    assert not engine.evaluate(frozenset({"follower"}), "publish", "conductor.set_tempo").allowed
