"""``sidecar dashboard``: a small read-only web page of the cluster (stdlib HTTP server).

Serves ``/`` (a page that asks the JSON API every second and draws a chart of the message
rates), ``/api/status`` (cluster report with members), ``/api/policy`` (rollout status) and
``/api/events`` as JSON, and ``/metrics`` for Prometheus
(:mod:`ops.metrics`). It listens on loopback unless credentials are set; with credentials every
request needs HTTP basic auth.
"""

from __future__ import annotations

import base64
import hmac
import html
import ipaddress
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import redis
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from coordinator.errors import ConfigurationError
from coordinator.keys import Keys
from coordinator.policy.store import PolicyStore
from coordinator.routing.rejections import DeadLetters
from coordinator.settings import Settings
from ops.metrics import registry
from ops.report import cluster_report, members_report, recent_events, subscriptions_report

__all__ = ["make_server"]

_PAGE = Path(__file__).with_name("static") / "dashboard.html"
"""The page: it asks the JSON API every second and draws what it gets (no full reloads)."""


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(settings: Settings, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A server for the dashboard; refuses a non-loopback ``host`` without credentials."""
    user, password = settings.dashboard_user, settings.dashboard_password
    if not _loopback(host) and not (user and password):
        raise ConfigurationError(f"the dashboard may listen on {host} only with credentials: set "
                                 "SIDECAR_DASHBOARD_USER and SIDECAR_DASHBOARD_PASSWORD")
    client = redis.Redis.from_url(settings.redis_url or "", decode_responses=True)
    keys = Keys(settings.namespace)
    metrics = registry(client, keys)
    expected = (base64.b64encode(f"{user}:{password}".encode()).decode()
                if user and password else None)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # quiet; no credentials logged
            return

        def _authorized(self) -> bool:
            if expected is None:
                return True
            header = self.headers.get("Authorization", "")
            # compared as bytes: compare_digest refuses non-ASCII text (http.server gives latin-1)
            return header.startswith("Basic ") and hmac.compare_digest(
                header[6:].encode("latin-1", "replace"), expected.encode())

        def _send(self, status: int, body: str, kind: str) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            if status == 401:
                self.send_header("WWW-Authenticate", 'Basic realm="sidecar"')
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if not self._authorized():
                self._send(401, "credentials required\n", "text/plain")
                return
            if self.path == "/api/status":
                report = cluster_report(client, keys)
                report["members"] = members_report(client, keys)
                self._send(200, json.dumps(report), "application/json")
            elif self.path == "/api/policy":
                self._send(200, json.dumps(PolicyStore(client, keys).status()), "application/json")
            elif self.path == "/metrics":
                self._send(200, generate_latest(metrics).decode(), CONTENT_TYPE_LATEST)
            elif self.path == "/api/events":
                self._send(200, json.dumps(recent_events(client, keys)), "application/json")
            elif self.path == "/api/subscriptions":
                self._send(200, json.dumps(subscriptions_report(client, keys)), "application/json")
            elif self.path == "/api/deadletters":
                letters = DeadLetters(client, keys, settings).list(count=50)
                self._send(200, json.dumps(letters), "application/json")
            elif self.path == "/":
                page = _PAGE.read_text().replace("__NS__", html.escape(keys.namespace))
                self._send(200, page, "text/html; charset=utf-8")
            else:
                self._send(404, "not found\n", "text/plain")

        def do_POST(self) -> None:
            """``/api/deadletters/<id>/replay``: the one change the page can make. It needs the
            dashboard's credentials (set, and given), and is refused cross-site: a custom header
            no form can send, and an Origin, when the browser gives one, naming this server."""
            if expected is None:
                self._send(403, "replaying needs SIDECAR_DASHBOARD_USER and SIDECAR_DASHBOARD_PASSWORD\n",
                           "text/plain")
                return
            if not self._authorized():
                self._send(401, "credentials required\n", "text/plain")
                return
            origin = self.headers.get("Origin")
            if self.headers.get("X-Sidecar-Action") != "replay" or (
                    origin is not None and origin != f"http://{self.headers.get('Host', '')}"):
                self._send(403, "refused: not sent by the dashboard's own page\n", "text/plain")
                return
            parts = self.path.strip("/").split("/")
            if len(parts) != 4 or parts[:2] != ["api", "deadletters"] or parts[3] != "replay":
                self._send(404, "not found\n", "text/plain")
                return
            try:
                target = DeadLetters(client, keys, settings).replay(parts[2])
            except KeyError as exc:
                self._send(404, json.dumps({"error": str(exc.args[0])}), "application/json")
                return
            except ValueError as exc:
                self._send(409, json.dumps({"error": str(exc)}), "application/json")
                return
            self._send(200, json.dumps({"replayed": parts[2], "to": target}), "application/json")

    return ThreadingHTTPServer((host, port), Handler)
