"""The sidecar's log format (coordinator.logs) in Celery's worker and beat, and beat's periodic
duties kept out of the info level.

Celery sets its processes' logging up itself (``-l``, ``-f``); its ``after_setup_logger`` and
``after_setup_task_logger`` signals (wired in workers.application) then call :func:`setup`, which
gives Celery's handlers the sidecar's formatter, applies ``SIDECAR_LOG_LEVEL`` when no ``-l`` was
given on the command line, and installs :class:`QuietDuties`.

Why a filter for the periodic duties: Celery logs "Task ... received" (``celery.worker.strategy``),
"Task ... succeeded" (``celery.app.trace``) and beat's "Sending due task" (``celery.beat``) at
INFO for every task, and has no per-task option for it. Beat sends a sweep and an election several
times a second per namespace, so at ``-l info`` those three lines drowned everything else. The
filter turns exactly those records of beat's own duties into DEBUG records: at ``-l debug`` they
are all still there, marked DEBUG; failures, retries and expiries of duties keep their level, and
the duties log at INFO themselves when something changed (coordinator.cluster.duties).
"""

from __future__ import annotations

import logging
from typing import Any

import click
from click.core import ParameterSource

from coordinator.logs import adopt, formatter, set_context
from coordinator.settings import Settings
from workers.schedule import beat_schedule

__all__ = ["CELERY_PER_TASK_LOGGERS", "QuietDuties", "level_flag_given", "periodic_tasks", "setup",
           "worker_started"]

CELERY_PER_TASK_LOGGERS = ("celery.worker.strategy", "celery.app.trace", "celery.beat")
"""Celery's loggers that write one INFO line per task received, finished or sent by beat."""


def periodic_tasks(settings: Settings) -> frozenset[str]:
    """Names of the tasks beat sends on its schedule (sidecar.sweep, sidecar.elect, ...)."""
    return frozenset(entry["task"] for entry in beat_schedule(settings).values())


class QuietDuties(logging.Filter):
    """Makes Celery's per-run INFO records about the ``names`` tasks DEBUG records (dropped unless
    their logger is enabled for DEBUG); every other record passes unchanged."""

    def __init__(self, names: frozenset[str]) -> None:
        super().__init__()
        self.names = names

    def about_duty(self, record: logging.LogRecord) -> bool:
        """True if ``record`` is Celery's line about one run of a task in ``names``."""
        data = getattr(record, "data", None)  # trace and strategy pass their context as extra
        if isinstance(data, dict):
            return data.get("name") in self.names
        args = record.args  # beat: 'Scheduler: Sending due task %s (%s)', entry name, task name
        return (record.name == "celery.beat" and isinstance(args, tuple) and len(args) == 2
                and args[1] in self.names)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not self.about_duty(record):
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return True


def level_flag_given(option: str = "loglevel") -> bool:
    """True unless the running click command (``celery worker``/``beat``) left ``option`` at its
    default; also True outside a click command (a level given in code wins as well)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return True
    source = ctx.get_parameter_source(option)
    return source is None or source != ParameterSource.DEFAULT


def _role() -> str | None:
    ctx = click.get_current_context(silent=True)
    name = ctx.info_name if ctx is not None else None
    return name if name in ("worker", "beat") else None


def setup(logger: logging.Logger, settings: Settings) -> None:
    """Make ``logger`` (one Celery has just set up) log the sidecar's way (see the module)."""
    adopt(settings)
    role = _role()
    if role == "beat":
        set_context(component="beat")
    elif role == "worker":
        set_context(component="worker")  # its name comes with celeryd_init (workers.application)
    for handler in logger.handlers:
        handler.setFormatter(formatter(settings.log_format))
    if settings.log_level and not level_flag_given():
        logger.setLevel(settings.log_level.upper())
    if logger is logging.getLogger():
        quiet = QuietDuties(periodic_tasks(settings))
        for name in CELERY_PER_TASK_LOGGERS:
            target = logging.getLogger(name)
            for old in [f for f in target.filters if isinstance(f, QuietDuties)]:
                target.removeFilter(old)
            target.addFilter(quiet)


def worker_started(hostname: Any) -> None:
    """Record the worker's Celery host name (``celeryd_init``: before logging is set up)."""
    set_context(component="worker", worker=str(hostname) if hostname else None)
