"""One log format for every sidecar process: worker, beat, bridge, CLI and peers.

Every record carries the same fields: ``time`` (UTC, ISO 8601 with milliseconds), ``level``,
``component`` (``worker``, ``beat``, ``router``, ``bridge``, ``duties``, ``cli``, ``mixin``, ...),
``namespace``, ``site``, ``peer_id`` (records a peer's mixin logs), ``worker`` (the Celery host
name), ``logger`` and ``message``, plus ``exc`` (the traceback) when there is one.

``SIDECAR_LOG_FORMAT=json`` writes them as one JSON object per line (every field present, ``null``
when unknown); ``text`` (the default) writes one line for people, the same fields compactly::

    2026-12-07T20:46:45.123Z INFO duties namespace=demo worker=w1@host: evicted 01J...: silent ...

The component is the record's own when it has one (``extra={"component": ...}``), else the part
after ``sidecar.`` of its logger's name (the mixin's loggers are all ``mixin``), else the process's
(:func:`set_context`: what the Celery wiring and :func:`configure` set). Namespace, site and worker
come from the record when it carries them, else from the process's context.

Secrets: the formatters replace the password of any URL (``redis://user:***@host``) and every value
given to :func:`hide` (``configure`` hides the secrets of the settings it is given; the mixin its
peer secret) with ``***``. That is a safety net; no code logs a secret on purpose.

**In an application** (a peer, a script, the CLI): the mixin is a library and never configures
logging; its records carry the fields through a :class:`PeerLog` whatever handlers the application
has. To get the sidecar's format (and ``SIDECAR_LOG_FORMAT`` / ``SIDECAR_LOG_LEVEL``), call once at
start-up::

    from coordinator.logs import configure
    configure()                       # or configure(settings, component="myapp", level="INFO")
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any
from urllib.parse import unquote, urlsplit

from coordinator.settings import Settings

__all__ = ["CONTEXT_FIELDS", "JsonFormatter", "Log", "PeerLog", "TextFormatter", "adopt", "configure",
           "fields_of", "formatter", "hide", "peer_logger", "redact", "secrets_of", "set_context"]

CONTEXT_FIELDS = ("component", "namespace", "site", "peer_id", "worker")
"""The fields every record carries besides time, level, logger, message (and exc)."""

Log = logging.Logger | logging.LoggerAdapter[logging.Logger]
"""What code that logs accepts: a logger, or one wrapped with context (:class:`PeerLog`)."""

_MIXIN_LOGGERS = frozenset({"peer", "link", "outbox", "nats"})
_context: dict[str, str] = {}
_hidden: tuple[str, ...] = ()
"""Values to mask, replaced whole (never changed in place) so formatting threads need no lock."""
_hide_lock = threading.Lock()
_HIDE_MIN = 6
"""Shorter values are not hidden: masking them would mangle ordinary words of every message."""
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/?#@:]*:)[^\s/?#]+@")
"""``scheme://user:password@``: a URL's user information, where '/', '?' and '#' cannot occur; the
password runs to the authority's last '@' (a password may hold '@', as urlsplit reads it)."""


# ---------------------------------------------------------------------------------------- context
def set_context(**fields: str | None) -> None:
    """Set (or, with ``None``, clear) fields of this process's context: ``component``, ``namespace``,
    ``site``, ``peer_id``, ``worker``. Records that carry a field themselves keep theirs."""
    for name, value in fields.items():
        if name not in CONTEXT_FIELDS:
            raise ValueError(f"unknown log context field {name!r}; one of {', '.join(CONTEXT_FIELDS)}")
        if value:
            _context[name] = str(value)
        else:
            _context.pop(name, None)


def hide(*values: str | None) -> None:
    """Replace each of ``values`` by ``***`` wherever the sidecar's formatters meet it (values
    shorter than six characters are ignored)."""
    global _hidden
    with _hide_lock:
        new = {v for v in values if v and len(v) >= _HIDE_MIN} - set(_hidden)
        if new:
            # longest first, so a secret that contains another is masked whole
            _hidden = tuple(sorted({*_hidden, *new}, key=len, reverse=True))


def redact(text: str) -> str:
    """``text`` with hidden values and URL passwords replaced by ``***`` (hidden values first: a
    URL rewritten first could leave part of a hidden value behind)."""
    for value in _hidden:
        if value in text:
            text = text.replace(value, "***")
    if "://" in text:
        text = _URL_PASSWORD.sub(r"\1***@", text)
    return text


def _component(record: logging.LogRecord) -> str:
    own = record.__dict__.get("component")
    if own:
        return str(own)
    head, _, rest = record.name.partition(".")
    if head == "sidecar" and rest:
        part = rest.split(".", 1)[0]
        return "mixin" if part in _MIXIN_LOGGERS else part
    return _context.get("component") or head or "root"


def fields_of(record: logging.LogRecord) -> dict[str, str | None]:
    """The context fields of ``record``: its own, else the process's (``None`` when unknown)."""
    out: dict[str, str | None] = {"component": _component(record)}
    for name in CONTEXT_FIELDS[1:]:
        value = record.__dict__.get(name) or _context.get(name)
        out[name] = str(value) if value else None
    return out


def _time(record: logging.LogRecord) -> str:
    stamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


# ---------------------------------------------------------------------------------------- formats
class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, component, namespace, site, peer_id, worker,
    logger, message and, with a traceback, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"time": _time(record), "level": record.levelname.lower(),
                               **fields_of(record), "logger": record.name,
                               "message": redact(record.getMessage())}
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = redact(record.exc_text)
        if record.stack_info:
            out["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """One line per record for people: ``time LEVEL component key=value...: message``, the
    context fields that are known only, then the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        fields = fields_of(record)
        context = " ".join(f"{k}={v}" for k, v in fields.items() if v and k != "component")
        head = f"{_time(record)} {record.levelname} {fields['component']}"
        line = f"{head} {context}: " if context else f"{head}: "
        text = line + record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + record.exc_text
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return redact(text)


def formatter(kind: str) -> logging.Formatter:
    """The formatter of ``SIDECAR_LOG_FORMAT`` value ``kind`` (``text`` or ``json``)."""
    if kind == "json":
        return JsonFormatter()
    if kind == "text":
        return TextFormatter()
    raise ValueError(f"log format must be text or json, got {kind!r}")


# ---------------------------------------------------------------------------------------- peers
class PeerLog(logging.LoggerAdapter[logging.Logger]):
    """A logger whose records carry fixed context fields (a peer's id, namespace, component);
    fields a call passes in ``extra=`` are kept as well."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


def peer_logger(logger: Log, *, peer_id: str | None, settings: Settings | None = None,
                component: str = "mixin") -> PeerLog:
    """``logger`` (a peer application's) with the peer's fields on every record it writes."""
    fields: dict[str, str] = {"component": component}
    if peer_id:
        fields["peer_id"] = peer_id
    if settings is not None:
        fields["namespace"] = settings.namespace
        if settings.site:
            fields["site"] = settings.site
    if isinstance(logger, logging.LoggerAdapter):
        fields = {**{k: str(v) for k, v in (logger.extra or {}).items()}, **fields}
        logger = logger.logger
    return PeerLog(logger, fields)


# ---------------------------------------------------------------------------------------- set-up
class _SidecarHandler(logging.StreamHandler[IO[str]]):
    """The handler :func:`configure` installs (so a second call replaces it)."""


class _StderrHandler(_SidecarHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (as logging's last resort does),
    so a replaced or captured standard error never leaves it writing to a closed file."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr  # under the handler's lock (Handler.handle)
        super().emit(record)


def secrets_of(settings: Settings) -> list[str]:
    """The secret values of ``settings``: secret fields and the passwords inside its URLs."""
    out: list[str] = []
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if not value or not isinstance(value, str):
            continue
        if f.metadata.get("secret"):
            out.append(value)
        elif f.name.endswith("_url"):
            out.extend(_url_passwords(value))
    return out


def _url_passwords(url: str) -> list[str]:
    out: list[str] = []
    for part in url.split(","):  # NATS takes a list of servers
        try:
            password = urlsplit(part.strip()).password
        except ValueError:
            continue
        if password:
            out.extend({password, unquote(password)})
    return out


def adopt(settings: Settings) -> None:
    """Take the process-wide context and the secrets to hide from ``settings``."""
    set_context(namespace=settings.namespace, site=settings.site)
    hide(*secrets_of(settings))


def configure(settings: Settings | None = None, *, component: str | None = None,
              level: str | int | None = None, stream: IO[str] | None = None,
              env: Mapping[str, str] | None = None) -> logging.Handler:
    """Log the sidecar's way from this process: one handler on the root logger (writing to
    ``stream``, standard error by default) in ``settings.log_format``, the root level set to
    ``level``, else ``settings.log_level``, else WARNING. ``settings`` defaults to
    ``Settings.from_env(env)``. Calling it again replaces the handler it installed; other handlers
    stay. Returns the handler."""
    settings = settings if settings is not None else Settings.from_env(env)
    adopt(settings)
    if component:
        set_context(component=component)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _SidecarHandler)]:
        root.removeHandler(old)
    handler = _SidecarHandler(stream) if stream is not None else _StderrHandler()
    handler.setFormatter(formatter(settings.log_format))
    root.addHandler(handler)
    chosen = level if level is not None else (settings.log_level or "WARNING")
    root.setLevel(chosen.upper() if isinstance(chosen, str) else chosen)
    return handler
