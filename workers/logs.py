"""Structured logs for the sidecar's Celery processes (``SIDECAR_LOG_FORMAT=json``).

Each record becomes one JSON object per line: ``ts`` (UTC, ISO 8601 with milliseconds), ``level``,
``logger``, ``message``, ``process`` (the Celery process's name and pid) and, when there is one,
``exc`` (the traceback as text), so a log shipper reads fields instead of parsing prose. Messages
are what the code logs already: no settings, secrets or payloads are added.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

__all__ = ["JsonFormatter", "use_json"]


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "process": f"{os.path.basename(sys.argv[0]) or 'python'}:{record.process}",
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def use_json(logger: logging.Logger) -> None:
    """Give every handler of ``logger`` the JSON formatter."""
    for handler in logger.handlers:
        handler.setFormatter(JsonFormatter())
