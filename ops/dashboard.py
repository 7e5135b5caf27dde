"""``sidecar dashboard``: a live web page of the cluster, served by Tornado (which Flower brings).

``/`` is a page that asks the JSON API every second and draws what it gets (no full reloads):
``/api/status`` (cluster report with every member), ``/api/policy`` (rollout status),
``/api/events`` (membership and leadership events), ``/api/leadership`` (leader and term
history), ``/api/workers`` (routers with their partitions, and the leases of the routers, the beat
and the bridge), ``/api/subscriptions`` and ``/api/deadletters``; ``/metrics`` serves Prometheus
(:mod:`ops.metrics`); ``/healthz`` says whether the dashboard reads Redis (no credentials needed).

It listens on loopback unless credentials are set; with credentials every request needs HTTP
basic auth. The one change it makes, replaying a dead letter, also needs credentials and is refused
cross-site (a POST with a custom header no form can send, from this server's own origin).

Redis is read with the blocking client on Tornado's thread pool, so a slow Redis slows an answer,
never the server.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import html
import ipaddress
import json
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import tornado.httpserver
import tornado.web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from coordinator.errors import ConfigurationError
from coordinator.keys import Keys
from coordinator.policy.store import PolicyStore
from coordinator.routing.rejections import DeadLetters
from coordinator.settings import Settings
from ops.metrics import registry
from ops.report import (
    cluster_report,
    leadership_report,
    members_report,
    recent_events,
    subscriptions_report,
    workers_report,
)

__all__ = ["Dashboard", "make_server"]

_PAGE = Path(__file__).with_name("static") / "dashboard.html"
"""The page: it asks the JSON API every second and draws what it gets (no full reloads)."""


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Base(tornado.web.RequestHandler):
    """Basic auth when credentials are set; JSON answers computed off the event loop."""

    def initialize(self, site: _Site) -> None:
        self.site = site

    def set_default_headers(self) -> None:
        # never inside another site's frame (a framed page could be clicked into a replay)
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Content-Security-Policy", "frame-ancestors 'none'")
        self.set_header("X-Content-Type-Options", "nosniff")

    def prepare(self) -> None:
        if not self.site.authorized(self.request.headers.get("Authorization", "")):
            self.set_header("WWW-Authenticate", 'Basic realm="sidecar"')
            self.set_status(401)
            self.finish("credentials required\n")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.set_header("Content-Type", "text/plain")
        self.finish(f"{self._reason}\n")  # never a traceback to the browser

    def log_exception(self, *args: Any) -> None:  # a 404 or 401 is not worth a warning
        if args and isinstance(args[1], tornado.web.HTTPError):
            return
        super().log_exception(*args)

    async def answer(self, compute: Callable[[], Any]) -> None:
        data = await asyncio.get_running_loop().run_in_executor(None, compute)
        self.send_json(data)

    def send_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(data, allow_nan=False))  # standard JSON: browsers refuse NaN


class _Api(_Base):
    async def get(self, name: str) -> None:
        view = self.site.views.get(name)
        if view is None:
            raise tornado.web.HTTPError(404)
        await self.answer(view)


class _Page(_Base):
    def get(self) -> None:
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(_PAGE.read_text().replace("__NS__", html.escape(self.site.keys.namespace)))


class _Metrics(_Base):
    async def get(self) -> None:
        body = await asyncio.get_running_loop().run_in_executor(None, generate_latest,
                                                                 self.site.metrics)
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(body)


class _Replay(_Base):
    """``POST /api/deadletters/<id>/replay``: needs the dashboard's credentials (set, and given),
    and is refused cross-site: a custom header no form can send, and an Origin, when the browser
    gives one, naming this server."""

    async def post(self, letter: str) -> None:
        if self.site.expected is None:
            self.set_status(403)
            self.finish("replaying needs SIDECAR_DASHBOARD_USER and SIDECAR_DASHBOARD_PASSWORD\n")
            return
        origin = self.request.headers.get("Origin")
        if self.request.headers.get("X-Sidecar-Action") != "replay" or (
                origin is not None and origin != f"{self.request.protocol}://{self.request.host}"):
            self.set_status(403)
            self.finish("refused: not sent by the dashboard's own page\n")
            return
        try:
            target = await asyncio.get_running_loop().run_in_executor(None, self.site.replay, letter)
        except KeyError as exc:
            self.send_json({"error": str(exc.args[0])}, 404)
            return
        except ValueError as exc:
            self.send_json({"error": str(exc)}, 409)
            return
        self.send_json({"replayed": letter, "to": target})


class _Health(_Base):
    """``/healthz``: ``ok`` while the dashboard can read Redis, 503 otherwise. It says nothing
    about the cluster, so it needs no credentials (for load balancers and health checks)."""

    def prepare(self) -> None:
        return  # the one path open without credentials

    async def get(self) -> None:
        self.set_header("Content-Type", "text/plain")
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.site.client.ping)
        except (redis.RedisError, OSError):
            self.set_status(503)
            self.finish("redis unreachable\n")
            return
        self.finish("ok\n")


class _Site:
    """What the handlers share: the Redis client, the views and the expected credentials."""

    def __init__(self, settings: Settings) -> None:
        user, password = settings.dashboard_user, settings.dashboard_password
        self.expected = (base64.b64encode(f"{user}:{password}".encode()).decode()
                         if user and password else None)
        self.client = redis.Redis.from_url(settings.redis_url or "", decode_responses=True)
        self.keys = Keys(settings.namespace)
        self.settings = settings
        self.metrics = registry(self.client, self.keys)
        client, keys = self.client, self.keys
        self.views: dict[str, Callable[[], Any]] = {
            "status": self.status,
            "policy": lambda: PolicyStore(client, keys).status(),
            "events": lambda: recent_events(client, keys),
            "leadership": lambda: leadership_report(client, keys, 200),
            "workers": lambda: workers_report(client, keys, settings.partitions),
            "subscriptions": lambda: subscriptions_report(client, keys),
            "deadletters": lambda: DeadLetters(client, keys, settings).list(count=50),
        }

    def authorized(self, header: str) -> bool:
        if self.expected is None:
            return True
        # compared as bytes: compare_digest refuses non-ASCII text
        return header.startswith("Basic ") and hmac.compare_digest(
            header[6:].encode("latin-1", "replace"), self.expected.encode())

    def status(self) -> dict[str, Any]:
        report = cluster_report(self.client, self.keys)
        report["members"] = members_report(self.client, self.keys)
        return report

    def replay(self, letter: str) -> str:
        return DeadLetters(self.client, self.keys, self.settings).replay(letter)


class Dashboard:
    """The dashboard bound to ``host:port`` (0: a free port) at construction, served by
    :meth:`serve_forever` on an event loop of its own until :meth:`shutdown` (from any thread)."""

    def __init__(self, settings: Settings, host: str = "127.0.0.1", port: int = 0) -> None:
        if not _loopback(host) and not (settings.dashboard_user and settings.dashboard_password):
            raise ConfigurationError(f"the dashboard may listen on {host} only with credentials: set "
                                     "SIDECAR_DASHBOARD_USER and SIDECAR_DASHBOARD_PASSWORD")
        site = _Site(settings)
        self.app = tornado.web.Application([
            (r"/", _Page, {"site": site}),
            (r"/metrics", _Metrics, {"site": site}),
            (r"/healthz", _Health, {"site": site}),
            (r"/api/deadletters/([^/]+)/replay", _Replay, {"site": site}),
            (r"/api/([a-z]+)", _Api, {"site": site}),
        ], compress_response=True)
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:  # one socket, one port (port 0: a free one), closed again if it cannot listen
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sockets = [sock]
        self.server_address: tuple[str, int] = self._sockets[0].getsockname()[:2]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._done = threading.Event()

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown` (or Ctrl-C)."""
        try:
            asyncio.run(self._serve())
        finally:
            self._done.set()

    async def _serve(self) -> None:
        server = tornado.httpserver.HTTPServer(self.app, xheaders=False)
        server.add_sockets(self._sockets)
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            server.stop()
            await server.close_all_connections()

    def shutdown(self) -> None:
        """Stop serving and wait until the loop has ended."""
        if not self._started.wait(10) or self._loop is None or self._stop is None:
            return
        self._loop.call_soon_threadsafe(self._stop.set)
        self._done.wait(10)

    def server_close(self) -> None:
        """Close the listening sockets."""
        for sock in self._sockets:
            sock.close()


def make_server(settings: Settings, host: str = "127.0.0.1", port: int = 0) -> Dashboard:
    """The dashboard for ``settings`` on ``host:port``; refuses a non-loopback ``host`` without
    credentials (:class:`~coordinator.errors.ConfigurationError`)."""
    return Dashboard(settings, host, port)
