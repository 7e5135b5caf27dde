"""What a peer says of itself (status fields, heartbeat payload): always sendable, checked on
arrival."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

from coordinator.protocol import MAX_STATUS_BYTES, parse_status, status_json


def test_status_json_sends_whatever_the_fields_hold() -> None:
    text = status_json({"at": datetime(2026, 12, 7, tzinfo=UTC), "rate": float("nan"),
                        "peak": float("inf"), "price": Decimal("1.5"), "nested": {"x": [float("-inf")]},
                        "ok": True})
    assert json.loads(text) == {"at": "2026-12-07 00:00:00+00:00", "rate": None, "peak": None,
                                "price": "1.5", "nested": {"x": [None]}, "ok": True}
    assert parse_status(text) is not None
    assert status_json({"pad": "x" * MAX_STATUS_BYTES}) == ""  # too big: the last status stays


def test_parse_status_keeps_bounded_json_objects_only() -> None:
    assert parse_status('{"a": 1}') == {"a": 1}
    for bad in (None, "", '{"a": NaN}', '{"a": -Infinity}', "[1]", "3", '"s"', "{",
                json.dumps({"pad": "x" * MAX_STATUS_BYTES})):
        assert parse_status(bad) is None, bad


class Ambiguous:
    """An array-like value: comparing it gives no truth value, and its text cannot be made."""

    def __eq__(self, other: object) -> bool:
        raise ValueError("the truth value of an array is ambiguous")

    __hash__ = object.__hash__

    def __str__(self) -> str:
        raise ValueError("no text")


def test_values_that_cannot_be_written_at_all_leave_the_last_status() -> None:
    looped: dict[str, object] = {}
    looped["self"] = looped
    assert status_json({"a": Ambiguous()}) == ""
    assert status_json({"loop": looped}) == ""
    assert parse_status(status_json({"n": Decimal("sNaN"), "ok": 1})) == {"n": "sNaN", "ok": 1}
