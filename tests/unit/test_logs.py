"""The one log format (coordinator.logs) and the filter that keeps beat's duties out of INFO."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import click
import pytest
from click.testing import CliRunner

from coordinator import logs
from coordinator.errors import ConfigurationError
from coordinator.logs import (
    JsonFormatter,
    TextFormatter,
    configure,
    hide,
    peer_logger,
    redact,
    secrets_of,
    set_context,
)
from coordinator.settings import Settings
from workers.logs import QuietDuties, level_flag_given, periodic_tasks

PEER = "01JABCDEFGHJKMNPQRSTVWXYZ0"


@pytest.fixture(autouse=True)
def clean_context() -> Iterator[None]:
    """Each test starts and ends with no process context and the root logger as it was."""
    set_context(**dict.fromkeys(logs.CONTEXT_FIELDS))
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    set_context(**dict.fromkeys(logs.CONTEXT_FIELDS))
    root.handlers[:] = handlers
    root.setLevel(level)


def record(name: str, msg: str, *args: object, level: int = logging.INFO,
           **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord(name, level, __file__, 1, msg, args or None, None)
    rec.__dict__.update(extra)
    return rec


def test_text_line_carries_the_fields_that_are_known() -> None:
    set_context(component="worker", namespace="demo", worker="w1@host")
    line = TextFormatter().format(record("sidecar.router", "router %s owns partition %d", "w1", 0))
    assert line.endswith("Z INFO router namespace=demo worker=w1@host: router w1 owns partition 0")
    # a logger outside the sidecar takes the process's component; unknown fields are left out
    line = TextFormatter().format(record("celery.worker.consumer", "ready", level=logging.WARNING))
    assert " WARNING worker namespace=demo worker=w1@host: ready" in line
    assert "site=" not in line and "peer_id=" not in line


def test_json_line_has_every_field_null_when_unknown() -> None:
    set_context(namespace="demo", site="eu")
    out = json.loads(JsonFormatter().format(record("sidecar.bridge", "bridge %s active", "b1")))
    assert out == {"time": out["time"], "level": "info", "component": "bridge", "namespace": "demo",
                   "site": "eu", "peer_id": None, "worker": None, "logger": "sidecar.bridge",
                   "message": "bridge b1 active"}
    assert out["time"].endswith("Z") and len(out["time"]) == len("2026-01-01T00:00:00.000Z")


def test_a_traceback_is_one_field_of_the_json_line() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger = logging.getLogger("sidecar.duties")
        rec = logger.makeRecord(logger.name, logging.ERROR, __file__, 1, "failed", None,
                                exc_info=sys.exc_info())
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    out = json.loads(line)
    assert out["component"] == "duties" and "RuntimeError: boom" in out["exc"]


def test_a_peers_records_carry_its_id_whatever_logger_the_app_gave() -> None:
    stream = io.StringIO()
    app_logger = logging.getLogger("tests.unit.app")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    app_logger.addHandler(handler)
    app_logger.setLevel(logging.INFO)
    app_logger.propagate = False
    try:
        log = peer_logger(app_logger, peer_id=PEER, settings=Settings(namespace="jobs", site="eu"))
        log.info("registered", extra={"attempt": 2})
        # wrapping an adapter again keeps one set of fields, the new ones winning
        peer_logger(log, peer_id="01OTHER", settings=None).warning("again")
    finally:
        app_logger.removeHandler(handler)
        app_logger.propagate = True
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (first["component"], first["peer_id"], first["namespace"], first["site"]) == (
        "mixin", PEER, "jobs", "eu")
    assert first["logger"] == "tests.unit.app"
    assert (second["peer_id"], second["namespace"]) == ("01OTHER", "jobs")


def test_the_mixins_own_loggers_are_one_component() -> None:
    for name in ("sidecar.peer", "sidecar.peer.Conductor", "sidecar.link", "sidecar.outbox", "sidecar.nats"):
        assert logs.fields_of(record(name, "x"))["component"] == "mixin"


def test_url_passwords_and_hidden_values_never_reach_a_line() -> None:
    assert redact("connect redis://sidecar:pa55-word@db:6379/0 failed") == \
        "connect redis://sidecar:***@db:6379/0 failed"
    assert redact("redis://:onlypass@h/0 and nats://u:p%40ss@n:4222") == "redis://:***@h/0 and nats://u:***@n:4222"
    assert redact("redis://db:6379/0 user@example.org") == "redis://db:6379/0 user@example.org"
    assert redact("http://host:8080/jobs?owner=a@b") == "http://host:8080/jobs?owner=a@b"
    # a password may hold '@' (redis-py reads up to the last one): none of it may show
    assert redact("redis://:hunter@2secret@redis:6379/0 down") == "redis://:***@redis:6379/0 down"
    hide("hunter@2secret")  # hidden first: the URL pass cannot leave a piece of it behind
    assert redact("redis://u:hunter@2secret@redis:6379/0") == "redis://u:***@redis:6379/0"
    hide("peer-secret-0123456789", "abc", None)
    assert redact("signed with peer-secret-0123456789!") == "signed with ***!"
    assert redact("abc") == "abc"  # too short to hide without mangling ordinary words
    line = TextFormatter().format(record("sidecar.router", "key %s", "peer-secret-0123456789"))
    assert "peer-secret" not in line


def test_secrets_of_settings_are_the_secret_fields_and_url_passwords() -> None:
    s = Settings(redis_url="redis://sidecar:r%2Fpass@h:1/0", peer_secret="ps-123456",
                 peer_key="pk-123456", dashboard_password="dash-123456",
                 nats_url="nats://a:np-1@n1:4222,nats://n2:4222")
    assert set(secrets_of(s)) == {"r%2Fpass", "r/pass", "ps-123456", "pk-123456", "dash-123456", "np-1"}


def test_configure_installs_one_handler_in_the_chosen_format_and_level() -> None:
    stream = io.StringIO()
    settings = Settings.from_env({"SIDECAR_LOG_FORMAT": "json", "SIDECAR_LOG_LEVEL": "Info",
                                  "SIDECAR_NAMESPACE": "app1", "SIDECAR_PEER_SECRET": "the-peer-secret"})
    configure(settings, component="myapp", stream=stream)
    handler = configure(settings, component="myapp", stream=stream)  # again: replaced, not added
    root = logging.getLogger()
    assert sum(isinstance(h, type(handler)) for h in root.handlers) == 1
    assert root.level == logging.INFO
    logging.getLogger("myapp.jobs").info("using the-peer-secret")
    logging.getLogger("myapp.jobs").debug("not at info")
    (line,) = stream.getvalue().splitlines()
    out = json.loads(line)
    assert (out["component"], out["namespace"], out["message"]) == ("myapp", "app1", "using ***")
    configure(Settings(), stream=stream)
    assert root.level == logging.WARNING  # neither level nor SIDECAR_LOG_LEVEL: warning


def test_log_level_is_checked_and_read_from_the_environment() -> None:
    assert Settings.from_env({"SIDECAR_LOG_LEVEL": "DEBUG"}).log_level == "DEBUG"
    assert Settings.from_env({}).log_level is None
    with pytest.raises(ConfigurationError, match="log_level must be one of"):
        Settings.from_env({"SIDECAR_LOG_LEVEL": "loud"})
    assert Settings(peer_secret="x" * 20).describe()["peer_secret"] == "***"


# ---------------------------------------------------------------------------------------- Celery's lines


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def celery_lines() -> Iterator[Capture]:
    """Celery's three per-task loggers with the filter on, their records captured."""
    names = ("celery.worker.strategy", "celery.app.trace", "celery.beat")
    capture, quiet = Capture(), QuietDuties(periodic_tasks(Settings()))
    saved = [(logging.getLogger(n).level, logging.getLogger(n).propagate) for n in names]
    for n in names:
        logging.getLogger(n).addFilter(quiet)
        logging.getLogger(n).addHandler(capture)
        logging.getLogger(n).propagate = False
    yield capture
    for n, (level, propagate) in zip(names, saved, strict=True):
        logger = logging.getLogger(n)
        logger.removeFilter(quiet)
        logger.removeHandler(capture)
        logger.setLevel(level)
        logger.propagate = propagate


def celery_logs_a_run_of(task: str) -> None:
    """What Celery writes for one task run: received, succeeded (and beat's send)."""
    from celery import beat
    from celery.app import trace

    context = {"id": "1", "name": task, "args": "()", "kwargs": "{}", "eta": None}
    logging.getLogger("celery.worker.strategy").info(trace.LOG_RECEIVED, context, extra={"data": context})
    trace.info(trace.LOG_SUCCESS, {"id": "1", "name": task, "return_value": "[]", "runtime": 0.001,
                                   "args": "()", "kwargs": "{}"})
    beat.info("Scheduler: Sending due task %s (%s)", task.rpartition(".")[2], task)


def test_celerys_lines_about_each_duty_run_are_gone_at_info(celery_lines: Capture) -> None:
    for name in ("celery.worker.strategy", "celery.app.trace", "celery.beat"):
        logging.getLogger(name).setLevel(logging.INFO)
    assert {"sidecar.sweep", "sidecar.elect", "sidecar.cluster_heartbeat", "sidecar.trim",
            "sidecar.distribute_policies", "sidecar.watch_inboxes"} == periodic_tasks(Settings())
    for task in periodic_tasks(Settings()):
        celery_logs_a_run_of(task)
    assert celery_lines.records == []
    celery_logs_a_run_of("sidecar.evict")  # an operator's action is news
    assert [r.levelname for r in celery_lines.records] == ["INFO"] * 3
    assert "sidecar.evict" in celery_lines.records[1].getMessage()


def test_at_debug_the_duty_lines_are_all_there_marked_debug(celery_lines: Capture) -> None:
    for name in ("celery.worker.strategy", "celery.app.trace", "celery.beat"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    celery_logs_a_run_of("sidecar.sweep")
    assert [r.levelname for r in celery_lines.records] == ["DEBUG"] * 3
    assert "Task sidecar.sweep[1] succeeded" in celery_lines.records[1].getMessage()


def test_a_failing_duty_keeps_its_level(celery_lines: Capture) -> None:
    logging.getLogger("celery.app.trace").setLevel(logging.INFO)
    context = {"id": "1", "name": "sidecar.sweep", "exc": "ConnectionError()"}
    logging.getLogger("celery.app.trace").error("Task %(name)s[%(id)s] raised: %(exc)s", context,
                                                extra={"data": context})
    assert [r.levelname for r in celery_lines.records] == ["ERROR"]


def test_level_flag_given_tells_a_flag_from_its_default() -> None:
    seen: list[bool] = []

    @click.command()
    @click.option("-l", "--loglevel", default="WARNING")
    def worker(loglevel: str) -> None:
        seen.append(level_flag_given())

    runner = CliRunner()
    assert runner.invoke(worker, []).exit_code == 0
    assert runner.invoke(worker, ["-l", "info"]).exit_code == 0
    assert seen == [False, True]
    assert level_flag_given()  # outside a command: the level set in code wins
