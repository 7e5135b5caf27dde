"""W3C trace context through the sidecar, when the OpenTelemetry API is installed (optional).

A ``traceparent`` header is always passed through untouched. With ``opentelemetry-api`` importable,
:func:`inject` adds the current span's context to a publish's headers (unless the caller set
``traceparent`` itself) and :func:`context_of` runs a handler inside the context its message
carries, so spans a handler starts are children of the publisher's. Without it both do nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["ACTIVE", "context_of", "inject"]

_context: Any = None
_propagate: Any = None
_trace: Any = None
try:
    from opentelemetry import context as _context
    from opentelemetry import propagate as _propagate
    from opentelemetry import trace as _trace
except ImportError:  # OpenTelemetry stays optional
    pass

ACTIVE = _propagate is not None
"""Whether the OpenTelemetry API is installed."""


def inject(headers: Any) -> Any:
    """``headers`` with the current span's trace context added, when there is one to add and
    ``headers`` is a mapping or None (anything else is returned as it is, for the check to refuse)."""
    if (_propagate is None or _trace is None or not (headers is None or isinstance(headers, Mapping))
            or not _trace.get_current_span().get_span_context().is_valid):
        return headers
    out = dict(headers or {})
    if "traceparent" not in out:
        carrier: dict[str, str] = {}
        _propagate.inject(carrier)
        out.update({k: v for k, v in carrier.items() if k not in out})
    return out


@contextlib.contextmanager
def context_of(headers: Mapping[str, str]) -> Iterator[None]:
    """Run the body inside the trace context ``headers`` carry (a no-op without one)."""
    if _propagate is None or _context is None or "traceparent" not in headers:
        yield
        return
    token: Any = _context.attach(_propagate.extract(dict(headers)))
    try:
        yield
    finally:
        _context.detach(token)
