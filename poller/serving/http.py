"""poller's HTTP server: health, readiness and metrics of the daemon, and the push path.

cheroot (CherryPy's WSGI server) parses HTTP; this module only routes. Its worker model: a
fixed pool of ``receiver.threads`` threads, each serving one request at a time; connections
beyond wait in the accept queue, so a flood cannot start unbounded work. A sender slower than
``receiver.timeout_seconds`` between bytes is cut off, without holding other workers.

Push routes (on when ``receiver.token`` is set), under ``receiver.path`` and also under the
old receiver's Lambda-era prefix ``/threatstack-to-s3``:

    POST {path}/<token>  or  POST {path} with ``Authorization: Bearer <token>``
    GET  /api/v1/s3/status                  the old receiver's shape
    GET  {path}/<id>                        the archived full record (token required)
    GET  {path}?start=&end=[&limit=]        archived alerts in an ISO 8601 range (token)

The token is compared in constant time and never logged: access logs show the path with
the token masked.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs

from cheroot import wsgi
from cheroot.ssl.builtin import BuiltinSSLAdapter
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from poller.config import ReceiverSettings
from poller.errors import PollerError
from poller.serving.pushes import PushedAlert, PushRejected, read_push
from poller.serving.receiver import Receiver
from poller.timeutil import parse_instant, utc_now

log = logging.getLogger(__name__)

LEGACY_PREFIX = "/threatstack-to-s3"
RANGE_LIMIT = 1000  # alerts per answer of the range route
Health = Callable[[], tuple[bool, dict[str, Any]]]
Reader = Callable[[str], Any]


class PushMetrics:
    def __init__(self, registry: CollectorRegistry, receiver: Receiver | None) -> None:
        self.requests = Counter(
            "poller_push_requests", "Push path requests, by result", ["result"], registry=registry
        )
        self.alerts = Counter(
            "poller_push_alerts", "Pushed alerts, by outcome", ["outcome"], registry=registry
        )
        self.latency = Histogram(
            "poller_push_seconds",
            "From a push's body read to its webhook records in the bucket (the 200)",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.queued = Gauge(
            "poller_push_detail_fetches_queued",
            "Pushed alerts waiting in this process for their full record to be fetched",
            registry=registry,
        )
        if receiver is not None:
            self.queued.set_function(lambda: float(receiver.queued))


class App:
    """The WSGI application. ``health``/``ready``: the daemon's (None in ``poller serve``)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        settings: ReceiverSettings,
        receiver: Receiver | None,
        read_object: Reader | None,
        list_webhooks: Callable[[datetime, datetime, int], list[Any]] | None,
        status: Callable[[], dict[str, Any]] | None,
        health: Health | None = None,
        ready: Health | None = None,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.receiver = receiver if settings.token else None
        self.read_object = read_object
        self.list_webhooks = list_webhooks
        self.status = status
        self.health = health
        self.ready = ready
        self.networks = [ipaddress.ip_network(c) for c in settings.allow_cidrs]
        self.metrics = PushMetrics(registry, self.receiver)

    # ------------------------------------------------------------------ WSGI
    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "") or "/"
        try:
            status, body, content_type = self._route(environ, method, path)
        except PushRejected as exc:
            status, body, content_type = exc.status, _error(exc.reason), "application/json"
        except Exception:
            log.exception("http.crashed", extra={"fields": {"path": self._masked(path)}})
            status, body, content_type = 500, _error("internal error"), "application/json"
        start_response(
            f"{status} {_REASONS.get(status, 'Error')}",
            [("Content-Type", content_type), ("Content-Length", str(len(body)))],
        )
        log.info(
            "http.request",
            extra={"fields": {"method": method, "path": self._masked(path), "status": status}},
        )
        return [body]

    def _masked(self, path: str) -> str:
        token = self.settings.token.get_secret_value()
        return path.replace(token, "***") if token else path

    def _route(self, environ: dict[str, Any], method: str, path: str) -> tuple[int, bytes, str]:
        if path == "/healthz" and self.health is not None:
            return _health(self.health)
        if path == "/readyz" and self.ready is not None:
            return _health(self.ready)
        if path == "/metrics":
            return 200, generate_latest(self.registry), CONTENT_TYPE_LATEST
        if path.startswith(LEGACY_PREFIX + "/"):
            path = path[len(LEGACY_PREFIX) :]
        if path == "/api/v1/s3/status" and method == "GET":
            return self._status()
        base = self.settings.path
        if path != base and not path.startswith(base + "/"):
            return 404, _error("not found"), "application/json"
        if self.receiver is None:
            return (
                404,
                _error("the push path is off (receiver.token is not set)"),
                "application/json",
            )
        self._check_source(environ)
        rest = path[len(base) :].strip("/")
        remaining = self._authenticate(environ, rest.split("/") if rest else [])
        if method == "POST" and not remaining:
            return self._push(environ)
        if method == "GET" and len(remaining) <= 1:
            return self._read(environ, remaining[0] if remaining else "")
        if method not in ("GET", "POST"):
            return 405, _error("method not allowed"), "application/json"
        return 404, _error("not found"), "application/json"

    # ------------------------------------------------------------------ guards
    def _check_source(self, environ: dict[str, Any]) -> None:
        if not self.networks:
            return
        try:
            address = ipaddress.ip_address(environ.get("REMOTE_ADDR", ""))
        except ValueError:
            address = None
        if address is None or not any(address in network for network in self.networks):
            self.metrics.requests.labels("forbidden").inc()
            raise PushRejected(403, "source address not allowed")

    def _authenticate(self, environ: dict[str, Any], parts: list[str]) -> list[str]:
        """The token from ``Authorization: Bearer`` or else the first path segment, compared
        in constant time; returns the path segments after it."""
        header = environ.get("HTTP_AUTHORIZATION", "")
        if header.lower().startswith("bearer "):
            given, remaining = header[7:].strip(), parts
        elif parts:
            given, remaining = parts[0], parts[1:]
        else:
            given, remaining = "", []
        if not hmac.compare_digest(given.encode(), self.settings.token.get_secret_value().encode()):
            self.metrics.requests.labels("unauthorized").inc()
            raise PushRejected(401, "a valid token is required")
        return remaining

    # ------------------------------------------------------------------ routes
    def _push(self, environ: dict[str, Any]) -> tuple[int, bytes, str]:
        started = time.monotonic()
        assert self.receiver is not None
        length_text = environ.get("CONTENT_LENGTH") or ""
        if not length_text.isdigit():
            raise PushRejected(411, "a Content-Length is required")
        length = int(length_text)
        if length > self.settings.max_body_bytes:
            self.metrics.requests.labels("too_large").inc()
            raise PushRejected(413, f"the body is over {self.settings.max_body_bytes} bytes")
        body = environ["wsgi.input"].read(length)
        try:
            alerts = read_push(body, environ.get("CONTENT_TYPE", ""))
        except PushRejected:
            self.metrics.requests.labels("rejected").inc()
            raise
        if not any(isinstance(item, PushedAlert) for item in alerts):
            # Nothing in it can be taken: the request as a whole is refused, nothing written.
            self.metrics.requests.labels("rejected").inc()
            reasons = [{"id": i.id, "result": "rejected", "reason": i.reason} for i in alerts]  # type: ignore[union-attr]
            document = {"success": False, "error": "no alert could be taken", "results": reasons}
            return 422, json.dumps(document).encode(), "application/json"
        results = self.receiver.take(alerts)
        for result in results:
            self.metrics.alerts.labels(result["result"]).inc()
        self.metrics.requests.labels("ok").inc()
        self.metrics.latency.observe(time.monotonic() - started)
        # Exactly 200 once the batch is durably taken: the vendor re-sends on anything else.
        document = {"success": True, "results": results}
        return 200, json.dumps(document).encode(), "application/json"

    def _read(self, environ: dict[str, Any], alert_id: str) -> tuple[int, bytes, str]:
        if alert_id:
            if self.read_object is None:
                return 404, _error("not found"), "application/json"
            alert = self.read_object(alert_id)
            if alert is None:
                return 404, _error(f"no archived alert {alert_id}"), "application/json"
            return 200, json.dumps({"success": True, "alert": alert}).encode(), "application/json"
        query = parse_qs(environ.get("QUERY_STRING", ""))
        try:
            now = utc_now()
            start = parse_instant(query["start"][0], now)
            end = parse_instant(query["end"][0], now)
            limit = min(int(query.get("limit", [str(RANGE_LIMIT)])[0]), RANGE_LIMIT)
        except (KeyError, ValueError):
            raise PushRejected(
                400, "start and end (ISO 8601) are required; limit <= 1000"
            ) from None
        assert self.list_webhooks is not None
        alerts = self.list_webhooks(start, end, limit)
        document = {"success": True, "alerts": alerts, "truncated": len(alerts) >= limit}
        return 200, json.dumps(document).encode(), "application/json"

    def _status(self) -> tuple[int, bytes, str]:
        document = self.status() if self.status is not None else {"success": True}
        return 200, json.dumps(document).encode(), "application/json"


def _health(check: Health) -> tuple[int, bytes, str]:
    ok, state = check()
    return (200 if ok else 503), json.dumps({"ok": ok, **state}).encode(), "application/json"


def _error(message: str) -> bytes:
    return json.dumps({"success": False, "error": message}).encode()


_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class HttpServer:
    """cheroot serving ``app`` on a background thread."""

    def __init__(self, app: App, host: str, port: int, settings: ReceiverSettings) -> None:
        self.server = wsgi.Server(
            (host, port),
            app,
            numthreads=settings.threads,
            timeout=int(max(settings.timeout_seconds, 1)),
            request_queue_size=64,
        )
        self.server.max_request_body_size = settings.max_body_bytes + 1
        self.server.max_request_header_size = 16 * 1024
        if settings.tls_cert_file:
            self.server.ssl_adapter = BuiltinSSLAdapter(
                settings.tls_cert_file, settings.tls_key_file
            )
        self._thread = threading.Thread(target=self.server.serve, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.bind_addr[1])

    def start(self) -> HttpServer:
        self.server.prepare()  # binds now, so the port is known and errors surface here
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.stop()


def status_document(store_ok: Callable[[], bool], api_ok: Callable[[], bool]) -> dict[str, Any]:
    """The old receiver's ``/status`` answer."""
    s3 = _safely(store_ok)
    threatstack = _safely(api_ok)
    return {
        "success": s3 and threatstack,
        "s3": {"success": s3},
        "threatstack": {"success": threatstack},
    }


def _safely(check: Callable[[], bool]) -> bool:
    try:
        return check()
    except (PollerError, OSError, ssl.SSLError):
        return False
