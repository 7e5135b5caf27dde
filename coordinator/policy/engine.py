"""Policy documents and their evaluation.

A document (JSON or YAML)::

    name: conductors
    statements:
      - id: tempo-control
        effect: allow                 # allow | deny
        role_ids: [conductor, "*"]    # "*" matches any role
        action: [publish, subscribe]  # publish | subscribe | "*" (or a list)
        resource: ["conductor.>"]     # topic patterns with NATS wildcards
        condition: {labels: {zone: a}}   # optional: the requester must carry these labels
    data: {anything: "free-form configuration for the peers"}

Evaluation over every statement of every document in force: a matching deny wins; else a matching
allow; else deny. For ``subscribe`` the requested pattern must lie entirely inside a statement's
resource pattern (``conductor.>`` covers ``conductor.*``; ``conductor.*`` does not cover
``conductor.>``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from coordinator.errors import InvalidPolicy
from coordinator.topics import check_pattern

__all__ = [
    "ACTIONS", "Decision", "InvalidPolicy", "Policy", "PolicyEngine", "Statement", "covers", "overlaps",
    "parse_policy",
]

ACTIONS = frozenset({"publish", "subscribe"})
_STATEMENT_KEYS = frozenset({"id", "effect", "role_ids", "action", "resource", "condition"})


def overlaps(a: str, b: str) -> bool:
    """True if some topic matches both patterns."""
    x, y = a.split("."), b.split(".")
    for i in range(max(len(x), len(y))):
        if i >= len(x) or i >= len(y):
            return False
        if x[i] == ">" or y[i] == ">":
            return True
        if x[i] != "*" and y[i] != "*" and x[i] != y[i]:
            return False
    return True


def covers(resource: str, pattern: str) -> bool:
    """True if every topic matching ``pattern`` also matches ``resource``."""
    r = resource.split(".")
    p = pattern.split(".")
    for i, tok in enumerate(r):
        if tok == ">":
            return len(p) > i
        if i >= len(p):
            return False
        if p[i] == ">":
            return False
        if tok != "*" and tok != p[i]:
            return False
    return len(r) == len(p)


@dataclass(frozen=True)
class Statement:
    """One rule of a policy."""

    id: str
    effect: str
    role_ids: frozenset[str]
    actions: frozenset[str]
    resources: tuple[str, ...]
    condition: Mapping[str, Any] = field(default_factory=dict)

    def applies(self, roles: Iterable[str], action: str, resource: str,
                labels: Mapping[str, str]) -> bool:
        if "*" not in self.role_ids and not self.role_ids.intersection(roles):
            return False
        if "*" not in self.actions and action not in self.actions:
            return False
        # An allow must cover everything requested; a deny applies as soon as it touches any of it,
        # so a wider subscription cannot reach around a denied topic.
        test = overlaps if self.effect == "deny" else covers
        if not any(test(r, resource) for r in self.resources):
            return False
        wanted = self.condition.get("labels") or {}
        return all(labels.get(k) == v for k, v in wanted.items())


@dataclass(frozen=True)
class Policy:
    """A named, validated policy document."""

    name: str
    statements: tuple[Statement, ...]
    data: Mapping[str, Any]
    document: Mapping[str, Any]
    """The document as given (what peers receive)."""


@dataclass(frozen=True)
class Decision:
    """Outcome of an evaluation and the statement that decided it."""

    allowed: bool
    reason: str
    statement: str | None = None


def _strings(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise InvalidPolicy(f"{where} must be a non-empty string or list of strings, got {value!r}")


def parse_policy(document: Mapping[str, Any] | str, name: str | None = None) -> Policy:
    """Validate a document (a mapping, or JSON/YAML text); raise InvalidPolicy naming the field."""
    if isinstance(document, str):
        document = _load_text(document)
    if not isinstance(document, Mapping):
        raise InvalidPolicy("a policy document must be a mapping with 'statements'")
    doc_name = name or document.get("name")
    if not isinstance(doc_name, str) or not doc_name.replace("-", "").replace("_", "").isalnum():
        raise InvalidPolicy(f"name must be letters, digits, '-' or '_', got {doc_name!r}")
    raw_statements = document.get("statements")
    if not isinstance(raw_statements, list):
        raise InvalidPolicy("statements must be a list")
    statements = []
    seen_ids: set[str] = set()
    for i, st in enumerate(raw_statements):
        where = f"statements[{i}]"
        if not isinstance(st, Mapping):
            raise InvalidPolicy(f"{where} must be a mapping")
        unknown = set(st) - _STATEMENT_KEYS
        if unknown:
            raise InvalidPolicy(f"{where} has unknown fields: {', '.join(sorted(unknown))}")
        sid = st.get("id", f"statement-{i}")
        if not isinstance(sid, str) or sid in seen_ids:
            raise InvalidPolicy(f"{where}.id must be a unique string, got {sid!r}")
        seen_ids.add(sid)
        effect = st.get("effect")
        if effect not in ("allow", "deny"):
            raise InvalidPolicy(f"{where}.effect must be 'allow' or 'deny', got {effect!r}")
        actions = _strings(st.get("action"), f"{where}.action")
        bad = [a for a in actions if a != "*" and a not in ACTIONS]
        if bad:
            raise InvalidPolicy(f"{where}.action has unknown actions {bad}; use publish, subscribe or *")
        resources = _strings(st.get("resource"), f"{where}.resource")
        for r in resources:
            try:
                check_pattern(r)
            except ValueError as exc:
                raise InvalidPolicy(f"{where}.resource: {exc}") from None
        condition = st.get("condition") or {}
        labels = condition.get("labels", {}) if isinstance(condition, Mapping) else None
        if not isinstance(condition, Mapping) or set(condition) - {"labels"} or not isinstance(
                labels, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in labels.items()):
            raise InvalidPolicy(f"{where}.condition may only hold 'labels': a mapping of strings")
        statements.append(Statement(sid, effect, frozenset(_strings(st.get("role_ids"),
                                    f"{where}.role_ids")), frozenset(actions), tuple(resources),
                                    dict(condition)))
    data = document.get("data") or {}
    if not isinstance(data, Mapping):
        raise InvalidPolicy("data must be a mapping")
    clean = {"name": doc_name, "statements": list(raw_statements), "data": dict(data)}
    return Policy(doc_name, tuple(statements), dict(data), clean)


def _load_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidPolicy(f"neither JSON nor YAML: {exc}") from None


class PolicyEngine:
    """Evaluates requests against a set of policies; decisions are cached per request shape."""

    def __init__(self, policies: Iterable[Policy] = ()) -> None:
        self.statements = [(p.name, s) for p in policies for s in p.statements]
        self._cache: dict[tuple[Any, ...], Decision] = {}

    def evaluate(self, roles: frozenset[str], action: str, resource: str,
                 labels: Mapping[str, str] | None = None) -> Decision:
        """Deny if any matching statement denies; else allow if one allows; else deny."""
        labels = labels or {}
        key = (roles, action, resource, tuple(sorted(labels.items())))
        found = self._cache.get(key)
        if found is not None:
            return found
        allow: str | None = None
        decision: Decision | None = None
        for name, st in self.statements:
            if st.applies(roles, action, resource, labels):
                if st.effect == "deny":
                    decision = Decision(False, f"denied by statement {st.id!r} of policy {name!r}",
                                        st.id)
                    break
                allow = allow or f"{name}/{st.id}"
        if decision is None:
            decision = (Decision(True, f"allowed by {allow}", allow.split("/", 1)[1]) if allow else
                        Decision(False, f"no statement allows {action} on {resource!r} "
                                        f"for roles {sorted(roles)}"))
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[key] = decision
        return decision
