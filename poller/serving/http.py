"""poller's HTTP applications (Flask): the daemon's health and metrics, and the push path.

The route policy is one table, ``push_routes``: each route with who may call it. A Flask
blueprint is built from it and mounted twice, at ``/`` and under the old receiver's
Lambda-era prefix ``/threatstack-to-s3``; one before-request hook enforces the table's
``who`` for the matched route, so no route exists without a policy and the order of
handlers decides nothing. Who:

- ``anyone``: no secret (it must cost nothing: the status route answers from a cache);
- ``push``: ``receiver.token`` (or ``receiver.previous_token`` during a rotation), as
  ``Authorization: Bearer`` or as the path segment ``<token>``; and the source allow-list;
- ``read``: ``receiver.read_token`` as ``Authorization: Bearer`` only; off without it.

Secrets are compared in constant time and never logged: access logs show the route's
pattern (``/api/v1/s3/alert/<token>``), never a path segment that might be a token.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlparse

from flask import Blueprint, Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import SecretStr
from werkzeug.exceptions import HTTPException

from poller.config import ReceiverSettings
from poller.errors import PollerError
from poller.serving.pushes import (
    SNS_TYPE_HEADER,
    PushedAlert,
    PushRejected,
    decode_body,
    read_push,
    unwrap,
)
from poller.serving.receiver import Receiver
from poller.timeutil import parse_instant, utc_now

log = logging.getLogger(__name__)

LEGACY_PREFIX = "/threatstack-to-s3"
STATUS_PATH = "/api/v1/s3/status"
RANGE_LIMIT = 1000  # alerts per answer of the range route
RANGE_SPAN = timedelta(days=7)  # one LIST per UTC day: at most 8 days of listings
STATUS_MAX_AGE_SECONDS = 60.0
# The status answer while the first check is still under way (in another request).
PROVISIONAL_STATUS = {
    "success": False,
    "s3": {"success": False},
    "threatstack": {"success": False},
    "checking": True,
}
Health = Callable[[], tuple[bool, dict[str, Any]]]
Reader = Callable[[str], Any]
Lister = Callable[[datetime, datetime, int], list[Any]]
Confirmer = Callable[[str], None]


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


class CachedStatus:
    """The old receiver's ``/status`` answer from the last known state: ``compute`` runs at
    most once per ``max_age`` seconds, one caller at a time; the others get the last answer
    at once (so the route costs no API request per call, whoever calls it).

    Nobody ever waits for another caller's compute, not even before the first answer
    exists (then they get ``provisional``): a compute can take the API's whole retry policy
    during an outage, and callers queued behind it would hold every worker of the listener,
    ``/healthz`` included."""

    def __init__(
        self,
        compute: Callable[[], dict[str, Any]],
        max_age: float = STATUS_MAX_AGE_SECONDS,
        monotonic: Callable[[], float] = time.monotonic,
        provisional: dict[str, Any] | None = None,
    ) -> None:
        self._compute = compute
        self._max_age = max_age
        self._monotonic = monotonic
        self._provisional = provisional or {"success": False, "checking": True}
        self._lock = threading.Lock()
        self._value: dict[str, Any] | None = None
        self._at = 0.0

    def __call__(self) -> dict[str, Any]:
        fresh = self._value is not None and self._monotonic() - self._at < self._max_age
        if fresh or not self._lock.acquire(blocking=False):
            return self._value if self._value is not None else self._provisional
        try:
            if self._value is None or self._monotonic() - self._at >= self._max_age:
                self._value = self._compute()
                self._at = self._monotonic()
            return self._value
        finally:
            self._lock.release()


@dataclass(frozen=True)
class Route:
    """One row of the route table."""

    rule: str
    methods: tuple[str, ...]
    who: str  # anyone | push | read
    view: Callable[..., Response]
    endpoint: str
    cost: str  # what one call costs, for the README's table


@dataclass
class PushParts:
    """What the push routes work with (built by ``app.Runtime.http_app``)."""

    settings: ReceiverSettings
    organization_id: str
    receiver: Receiver | None
    read_object: Reader
    list_webhooks: Lister
    status: Callable[[], dict[str, Any]]
    confirm_subscription: Confirmer


def json_response(status: int, document: Any) -> Response:
    return Response(json.dumps(document), status=status, mimetype="application/json")


def _error(status: int, message: str) -> Response:
    return json_response(status, {"success": False, "error": message})


class PushRoutes:
    """The push path's views and its policy table."""

    def __init__(self, parts: PushParts, metrics: PushMetrics) -> None:
        self.parts = parts
        self.settings = parts.settings
        self.metrics = metrics
        self.allowed = [ipaddress.ip_network(c) for c in self.settings.allow_cidrs]
        self.proxies = [ipaddress.ip_network(c) for c in self.settings.trusted_proxies]
        path = self.settings.path
        self.table = [
            Route(STATUS_PATH, ("GET",), "anyone", self.status, "status", "no API request"
                  " (the last known state, refreshed at most once a minute)"),
            Route(path, ("POST",), "push", self.push, "push", "per alert: 1 GET + 2-3 PUTs"),
            Route(f"{path}/<token>", ("POST",), "push", self.push, "push_in_path",
                  "per alert: 1 GET + 2-3 PUTs"),
            Route(f"{path}/<alert_id>", ("GET",), "read", self.read_one, "read_one", "1 GET"),
            Route(path, ("GET",), "read", self.read_range, "read_range",
                  f"1 LIST per UTC day (at most {RANGE_SPAN.days + 1}) + 1 GET per alert"
                  f" (at most {RANGE_LIMIT})"),
        ]  # fmt: skip
        self.policy = {route.endpoint: route.who for route in self.table}

    def blueprint(self, name: str) -> Blueprint:
        blueprint = Blueprint(name, __name__)
        for route in self.table:
            blueprint.add_url_rule(
                route.rule, route.endpoint, route.view, methods=list(route.methods)
            )
        blueprint.before_request(self.enforce)
        return blueprint

    # ------------------------------------------------------------------ the policy
    def enforce(self) -> Response | None:
        """The table's ``who`` for the matched route; None lets the view run."""
        endpoint = (request.endpoint or "").rpartition(".")[2]
        who = self.policy.get(endpoint)
        if who == "anyone":
            return None
        if who == "push":
            if self.parts.receiver is None:
                return _error(404, "the push path is off (receiver.token is not set)")
            if not self._source_allowed():
                self.metrics.requests.labels("forbidden").inc()
                return _error(403, "source address not allowed")
            given = self._bearer() or (request.view_args or {}).get("token", "")
            tokens = (self.settings.token, self.settings.previous_token)
            if not _matches(given, tokens):
                self.metrics.requests.labels("unauthorized").inc()
                return _error(401, "a valid token is required")
            return None
        if who == "read":
            if not self.settings.read_token:
                return _error(404, "the read-back routes are off (receiver.read_token is not set)")
            if not _matches(self._bearer(), (self.settings.read_token,)):
                return _error(401, "the read token is required (Authorization: Bearer)")
            return None
        return _error(404, "not found")  # no route without a policy

    def _bearer(self) -> str:
        header = request.headers.get("Authorization", "")
        return header[7:].strip() if header.lower().startswith("bearer ") else ""

    def client_address(self) -> str:
        """The sender: ``REMOTE_ADDR``, or, when that is a trusted proxy, the nearest
        address in ``X-Forwarded-For`` that is not one."""
        address = request.environ.get("REMOTE_ADDR", "")
        forwarded = [a.strip() for a in request.headers.get("X-Forwarded-For", "").split(",")]
        while self._is_proxy(address) and forwarded and forwarded[-1]:
            address = forwarded.pop()
        return str(address)

    def _is_proxy(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.proxies)

    def _source_allowed(self) -> bool:
        if not self.allowed:
            return True
        try:
            ip = ipaddress.ip_address(self.client_address())
        except ValueError:
            return False
        return any(ip in network for network in self.allowed)

    # ------------------------------------------------------------------ views
    def status(self) -> Response:
        return json_response(200, self.parts.status())

    def push(self, token: str = "") -> Response:
        started = time.monotonic()
        receiver = self.parts.receiver
        assert receiver is not None
        limit = self.settings.max_body_bytes
        try:
            body = decode_body(
                request.get_data(cache=False), request.headers.get("Content-Encoding", ""), limit
            )
            document, confirmation = unwrap(
                body,
                request.headers.get("Content-Type", ""),
                request.headers.get(SNS_TYPE_HEADER, ""),
            )
            if confirmation is not None:
                return self._sns_confirmation(confirmation.topic_arn, confirmation.subscribe_url)
            if document is None:  # an SNS UnsubscribeConfirmation: nothing to do
                return json_response(200, {"success": True, "results": []})
            alerts = read_push(document, self.parts.organization_id)
        except PushRejected as exc:
            label = "too_large" if exc.status == 413 else "rejected"
            self.metrics.requests.labels(label).inc()
            return _error(exc.status, exc.reason)
        results = receiver.take(alerts, utc_now())
        for result in results:
            self.metrics.alerts.labels(result["result"]).inc()
        self.metrics.requests.labels("ok").inc()
        self.metrics.latency.observe(time.monotonic() - started)
        if any(not isinstance(item, PushedAlert) for item in alerts):
            log.warning(
                "push.quarantined",
                extra={"fields": {"results": [r for r in results if r["result"] == "quarantined"]}},
            )
        # Exactly 200 once every alert is archived or quarantined: the vendor re-sends on
        # anything else, then drops the batch.
        return json_response(200, {"success": True, "results": results})

    def _sns_confirmation(self, topic: str, url: str) -> Response:
        host = urlparse(url).hostname or ""
        trusted_host = urlparse(url).scheme == "https" and _is_sns_host(host)
        if trusted_host and topic in self.settings.sns_topics:
            self.parts.confirm_subscription(url)
            log.info("push.sns_confirmed", extra={"fields": {"topic": topic}})
            return json_response(200, {"success": True, "sns": "confirmed"})
        why = "not an SNS host" if not trusted_host else "topic not in receiver.sns_topics"
        log.warning(
            "push.sns_confirmation_pending",
            extra={
                "fields": {
                    "topic": topic,
                    "why": why,
                    "to_confirm": "open this URL once, or add the topic to receiver.sns_topics",
                    "subscribe_url": url,
                }
            },
        )
        return json_response(200, {"success": True, "sns": "logged, not confirmed", "why": why})

    def read_one(self, alert_id: str) -> Response:
        alert = self.parts.read_object(alert_id)
        if alert is None:
            return _error(404, f"no archived alert {alert_id[:128]}")
        return json_response(200, {"success": True, "alert": alert})

    def read_range(self) -> Response:
        try:
            now = utc_now()
            start = parse_instant(request.args["start"], now)
            end = parse_instant(request.args["end"], now)
            limit = int(request.args.get("limit", str(RANGE_LIMIT)))
        except (KeyError, ValueError):
            return _error(400, f"start and end (ISO 8601) are required; limit <= {RANGE_LIMIT}")
        if not 0 < limit <= RANGE_LIMIT:
            return _error(400, f"limit must be 1 to {RANGE_LIMIT}")
        if not timedelta(0) < end - start <= RANGE_SPAN:
            return _error(
                400, f"a range spans at most {RANGE_SPAN.days} days (end after start); page it"
            )
        alerts = self.parts.list_webhooks(start, end, limit)
        return json_response(
            200, {"success": True, "alerts": alerts, "truncated": len(alerts) >= limit}
        )


SNS_HOST = re.compile(r"sns\.[a-z]{2}(-[a-z]+)+-\d\.amazonaws\.com(\.cn)?")


def _is_sns_host(host: str) -> bool:
    """``sns.<region>.amazonaws.com`` (and the China partition's ``.amazonaws.com.cn``)
    exactly: not any name under amazonaws.com that starts with ``sns.`` (an S3 bucket named
    ``sns.anything`` is ``sns.anything.s3.amazonaws.com``, and a website bucket redirects
    wherever its owner likes)."""
    return SNS_HOST.fullmatch(host.lower()) is not None


def _matches(given: str, secrets: Iterable[SecretStr]) -> bool:
    ok = False
    for secret in secrets:  # every one compared, in constant time
        if secret:
            ok |= hmac.compare_digest(given.encode(), secret.get_secret_value().encode())
    return ok


def build_app(
    registry: CollectorRegistry,
    *,
    health: Health | None = None,
    ready: Health | None = None,
    push: PushParts | None = None,
    metrics_route: bool = True,
) -> Flask:
    """One WSGI application: the health routes (when given) and the push routes (when
    given). The daemon builds one per listener (see ``serving.daemon``)."""
    app = Flask("poller")
    app.config["MAX_CONTENT_LENGTH"] = None  # the server enforces the body limit
    if health is not None:
        app.add_url_rule("/healthz", "healthz", lambda: _health(health))
    if ready is not None:
        app.add_url_rule("/readyz", "readyz", lambda: _health(ready))
    if metrics_route:
        app.add_url_rule(
            "/metrics", "metrics", lambda: Response(generate_latest(registry), 200,
                                                    content_type=CONTENT_TYPE_LATEST)
        )  # fmt: skip
    if push is not None:
        routes = PushRoutes(push, PushMetrics(registry, push.receiver))
        app.register_blueprint(routes.blueprint("push"))
        app.register_blueprint(routes.blueprint("push"), url_prefix=LEGACY_PREFIX, name="legacy")
        app.extensions["poller_push"] = routes

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        return _error(exc.code or 500, (exc.name or "error").lower())

    @app.errorhandler(PollerError)
    def storage_error(exc: PollerError) -> Response:
        log.error("http.failed", extra={"fields": {"path": _logged_path(), "error": str(exc)}})
        return _error(503, "the archive is unavailable; send again later")

    @app.errorhandler(Exception)
    def crashed(exc: Exception) -> Response:
        log.error(
            "http.crashed",
            extra={"fields": {"path": _logged_path(), "error": type(exc).__name__}},
            exc_info=exc,
        )
        return _error(500, "internal error")

    @app.before_request
    def started() -> None:
        g.started = time.monotonic()

    @app.after_request
    def access_log(response: Response) -> Response:
        log.info(
            "http.request",
            extra={
                "fields": {
                    "method": request.method,
                    "path": _logged_path(),
                    "status": response.status_code,
                }
            },
        )
        return response

    return app


def _logged_path() -> str:
    """The route's pattern when one matched (no path segment of it is logged), else the path
    with every segment that is not a literal segment of some route masked: a wrong token
    may come in any shape of path (``/api/v1/s3//alert/<token>``, ``.../alerts/<token>``,
    a typo of the real one), and none of them is ever logged."""
    rule = request.url_rule
    if rule is not None:
        return str(rule.rule)
    from flask import current_app

    known = {
        segment
        for url_rule in current_app.url_map.iter_rules()
        for segment in url_rule.rule.split("/")
        if "<" not in segment
    }
    return "/".join(s if s in known else "***" for s in request.path.split("/"))


def _health(check: Health) -> Response:
    ok, state = check()
    return json_response(200 if ok else 503, {"ok": ok, **state})


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
    except (PollerError, OSError):
        return False
