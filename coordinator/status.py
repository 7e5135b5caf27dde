"""Status reporting through descriptors: ``StatusField`` and ``StatusMixin``.

A class declares ``tempo = StatusField(120)``; instances read and assign it like an attribute.
``obj.status`` is ``{<lowercased concrete class name>: {field: value, ...}}`` with the fields of every
class in the MRO merged into that one section, values made plain (sets become sorted lists), sensitive
fields shown as ``"***"`` and hidden fields left out. Dirty flags and update times are kept per field
and read separately (``status_dirty()``, ``status_updated_at()``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar, overload

__all__ = ["StatusField", "StatusMixin"]

T = TypeVar("T")
_MISSING: Any = object()


class StatusField(Generic[T]):
    """A reported attribute. ``default`` (or ``default_factory()``) is the value until assigned."""

    def __init__(self, default: T = _MISSING, *, default_factory: Callable[[], T] | None = None,
                 sensitive: bool = False, hidden: bool = False, doc: str | None = None) -> None:
        self.default = default
        self.default_factory = default_factory
        self.sensitive = sensitive
        self.hidden = hidden
        self.__doc__ = doc
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type) -> StatusField[T]: ...
    @overload
    def __get__(self, obj: object, owner: type) -> T: ...
    def __get__(self, obj: object | None, owner: type) -> StatusField[T] | T:
        if obj is None:
            return self
        values = _store(obj)
        if self.name not in values:
            if self.default_factory is not None:
                values[self.name] = self.default_factory()
            elif self.default is not _MISSING:
                return self.default
            else:
                raise AttributeError(f"status field {self.name!r} has no value yet")
        return values[self.name]  # type: ignore[no-any-return]

    def __set__(self, obj: object, value: T) -> None:
        # on a peer's hot path (a counter per message): no throwaway containers, one dict walk
        state = obj.__dict__
        values = state.get("_status_values")
        if values is None:
            values = state["_status_values"] = {}
        name = self.name
        if values.get(name, _MISSING) != value:
            dirty = state.get("_status_dirty")
            if dirty is None:
                dirty = state["_status_dirty"] = set()
            dirty.add(name)
        values[name] = value
        updated = state.get("_status_updated")
        if updated is None:
            updated = state["_status_updated"] = {}
        updated[name] = time.time()

    def __repr__(self) -> str:
        return f"StatusField(name={self.name!r}, sensitive={self.sensitive}, hidden={self.hidden})"


def _store(obj: object) -> dict[str, Any]:
    state = obj.__dict__
    values = state.get("_status_values")
    if values is None:
        values = state["_status_values"] = {}
    return values


def _plain(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return sorted(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


class StatusMixin:
    """Gives ``status`` built from every :class:`StatusField` declared along the MRO."""

    @classmethod
    def status_fields(cls) -> dict[str, StatusField[Any]]:
        """Every status field of the class, base classes first, overrides winning."""
        out: dict[str, StatusField[Any]] = {}
        for klass in reversed(cls.__mro__):
            for name, attr in vars(klass).items():
                if isinstance(attr, StatusField):
                    out[name] = attr
        return out

    def status_snapshot(self, *, include_hidden: bool = False) -> dict[str, Any]:
        """The fields as plain values (sensitive ones masked), without the class-name section."""
        out: dict[str, Any] = {}
        for name, field in type(self).status_fields().items():
            if field.hidden and not include_hidden:
                continue
            try:
                value = getattr(self, name)
            except AttributeError:
                continue
            out[name] = "***" if field.sensitive and value is not None else _plain(value)
        return out

    @property
    def status(self) -> dict[str, dict[str, Any]]:
        """``{<lowercased class name>: {field: value}}``, as the seed's examples print it."""
        return {type(self).__name__.lower(): self.status_snapshot()}

    def status_dirty(self) -> dict[str, bool]:
        """For each field, whether it changed since :meth:`clear_status_dirty`."""
        dirty = self.__dict__.get("_status_dirty", set())
        return {name: name in dirty for name in type(self).status_fields()}

    def status_updated_at(self) -> dict[str, float | None]:
        """For each field, when it was last assigned (epoch seconds), or None."""
        updated = self.__dict__.get("_status_updated", {})
        return {name: updated.get(name) for name in type(self).status_fields()}

    def clear_status_dirty(self) -> None:
        """Mark every field clean (for example after reporting it)."""
        self.__dict__["_status_dirty"] = set()
