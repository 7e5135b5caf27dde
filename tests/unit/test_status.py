"""StatusField / StatusMixin: sections, MRO merge, masking, hidden fields, dirty flags."""

from __future__ import annotations

import time

import pytest

from mixin import StatusField, StatusMixin


class Base(StatusMixin):
    name = StatusField("base")
    count = StatusField(0)
    token = StatusField[str | None](None, sensitive=True)


class Conductor(Base):
    tempo = StatusField(120, doc="beats per minute")
    time_signature = StatusField((4, 4))
    tags = StatusField[set[str]](default_factory=set)
    internal = StatusField(0, hidden=True)
    count = StatusField(10)  # overrides the base default


class Plain(StatusMixin):
    pass


def test_status_section_is_lowercased_class_name() -> None:
    c = Conductor()
    assert list(c.status) == ["conductor"]
    assert list(Base().status) == ["base"]
    assert Plain().status == {"plain": {}}


def test_fields_of_the_whole_mro_are_merged_into_one_section() -> None:
    c = Conductor()
    section = c.status["conductor"]
    assert set(section) == {"name", "count", "token", "tempo", "time_signature", "tags"}
    assert section["name"] == "base"
    assert section["tempo"] == 120
    assert section["count"] == 10  # the subclass's field wins
    assert list(Conductor.status_fields())[:3] == ["name", "count", "token"]  # base first


def test_assignment_and_defaults_are_per_instance() -> None:
    a, b = Conductor(), Conductor()
    a.tempo = 90
    a.tags.add("x")
    assert a.tempo == 90 and b.tempo == 120
    assert b.tags == set()
    assert a.status["conductor"]["tempo"] == 90


def test_class_access_returns_the_descriptor() -> None:
    field = Conductor.__dict__["tempo"]
    assert Conductor.tempo is field
    assert isinstance(field, StatusField)
    assert field.name == "tempo"
    assert field.__doc__ == "beats per minute"
    assert "tempo" in repr(field)


def test_sensitive_fields_are_masked() -> None:
    c = Conductor()
    assert c.status["conductor"]["token"] is None  # nothing to hide yet
    c.token = "hunter2"
    assert c.token == "hunter2"
    assert c.status["conductor"]["token"] == "***"
    assert c.status_snapshot(include_hidden=True)["token"] == "***"
    assert "hunter2" not in repr(c.status)


def test_hidden_fields_only_in_the_full_snapshot() -> None:
    c = Conductor()
    c.internal = 5
    assert "internal" not in c.status["conductor"]
    assert "internal" not in c.status_snapshot()
    assert c.status_snapshot(include_hidden=True)["internal"] == 5


def test_values_are_made_plain() -> None:
    c = Conductor()
    c.tags = {"b", "c", "a"}
    c.name = {"k": frozenset({3, 1}), 2: [{"z", "y"}]}  # type: ignore[assignment]
    section = c.status["conductor"]
    assert section["tags"] == ["a", "b", "c"]
    assert section["time_signature"] == (4, 4)
    assert isinstance(section["time_signature"], tuple)
    assert section["name"] == {"k": [1, 3], "2": [["y", "z"]]}


def test_field_without_default_is_left_out_until_assigned() -> None:
    class Late(StatusMixin):
        value = StatusField[int]()

    late = Late()
    with pytest.raises(AttributeError, match="value"):
        _ = late.value
    assert late.status == {"late": {}}
    late.value = 3
    assert late.status == {"late": {"value": 3}}


def test_dirty_flags_and_update_times() -> None:
    c = Conductor()
    assert not any(c.status_dirty().values())
    assert set(c.status_dirty()) == set(Conductor.status_fields())
    assert all(v is None for v in c.status_updated_at().values())

    before = time.time()
    c.tempo = 100
    after = time.time()
    dirty = c.status_dirty()
    assert dirty["tempo"] is True
    assert dirty["name"] is False
    stamp = c.status_updated_at()["tempo"]
    assert stamp is not None and before <= stamp <= after
    assert c.status_updated_at()["name"] is None

    c.clear_status_dirty()
    assert not any(c.status_dirty().values())
    c.tempo = 100  # same value: assigned again, but not a change
    assert c.status_dirty()["tempo"] is False
    assert c.status_updated_at()["tempo"] >= stamp  # type: ignore[operator]
    c.internal = 1  # hidden fields have flags too
    assert c.status_dirty()["internal"] is True


def test_first_assignment_equal_to_default_marks_dirty() -> None:
    c = Conductor()
    c.tempo = 120
    assert c.status_dirty()["tempo"] is True
