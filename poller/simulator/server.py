"""The simulator's HTTP server (stdlib ``ThreadingHTTPServer``, loopback only)."""

from __future__ import annotations

import base64
import json
import logging
import random
import socket
import threading
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import mohawk
import mohawk.exc

from poller.simulator.alerts import DISMISS_REASONS, AlertFactory, SimAlert, iso_ms
from poller.timeutil import Clock, utc_now

log = logging.getLogger(__name__)

PAGE_SIZE = 100
DISMISSED_BY = "analyst@example.com"  # who dismisses through the API (a Hawk user's name)
FAULT_KINDS = ("429", "500", "502", "503", "slow", "drop", "truncate", "bad_json")


@dataclass(frozen=True)
class Credentials:
    user_id: str = "5f1e00000000000000000001"
    org_id: str = "5f1e000000000000000000aa"
    api_key: str = "simulator-api-key-0123456789abcdef"  # a test value, not a secret


@dataclass
class Faults:
    """Faults to inject. Mutable while the simulator runs.

    ``every``: every Nth request fails, the kind rotating through FAULT_KINDS (deterministic,
    so a run of a few dozen requests meets each kind). ``rate``: a kind -> share of requests
    drawn at random (``{"503": 1.0}`` breaks every request)."""

    every: int | None = None
    rate: dict[str, float] = field(default_factory=dict)
    slow_seconds: float = 3.0
    duplicates_across_pages: bool = False
    shuffle_pages: bool = False
    org_limit_per_minute: int | None = None  # the vendor's org-wide limit, e.g. 200
    trickle_seconds: float = 0.0  # send each 200 body in 20 pieces spread over this long
    ignore_token: bool = False  # answer page one, with a fresh token, whatever is asked
    # A gateway that compresses when the request asks for it: "gzip", "deflate" (zlib
    # framing, RFC 9110) or "raw-deflate" (labelled deflate, no framing, as some servers do).
    compress: str | None = None
    # A 429 storm: the next N authenticated requests answer 429 with this reset header
    # (milliseconds, per the vendor; "1" is a tiny reset, "30" a reset given in seconds).
    rate_limit_storm: int = 0
    rate_limit_reset: str = "1000"
    empty_pages: int = 0  # before every page with alerts, this many empty ones with a token
    endless: bool = False  # after the last page, empty pages with a fresh token for ever
    # The Nth listing request (1-based) is held before it is answered until
    # ``Simulator.release_hold()``: a test does something (takes a lease over) mid-walk.
    hold_listing: int = 0
    # Alert ids whose detail (``GET /v2/alerts/<id>``) answers 500, every time.
    broken_ids: set[str] = field(default_factory=set)

    @classmethod
    def spread(cls, share: float, **extra: Any) -> Faults:
        """``share`` of requests failing, in turn in every way FAULT_KINDS lists."""
        return cls(every=round(1 / share) if share > 0 else None, **extra)


@dataclass(frozen=True)
class RequestRecord:
    at: float  # time.time() when the request arrived
    path: str
    status: int
    query: str = ""  # the raw query string (status, from, until, token)


def _gateway_encode(body: bytes, mode: str, accept: str) -> tuple[bytes, str | None]:
    """What a compressing gateway sends for ``body``: the coded body and its coding name, or
    the body as it is when the request did not ask for the coding."""
    coding = "gzip" if mode == "gzip" else "deflate"
    asked = {part.split(";")[0].strip().lower() for part in accept.split(",")}
    if not body or coding not in asked:
        return body, None
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(mode, -zlib.MAX_WBITS)
    packer = zlib.compressobj(6, zlib.DEFLATED, wbits)
    return packer.compress(body) + packer.flush(), coding


def _dismiss_filter(
    ids: list[str] | None, query: dict[str, Any] | None
) -> Callable[[SimAlert], bool]:
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ValueError("ids must be a list of alert ids")
        chosen = set(ids)
        return lambda alert: alert.id in chosen
    assert query is not None
    try:
        since, until = _parse_time(str(query["from"])), _parse_time(str(query["until"]))
    except (KeyError, ValueError):
        raise ValueError("a dismissal by query needs from and until (ISO-8601)") from None
    filters = {k: query[k] for k in ("severity", "ruleID", "agentID") if query.get(k) is not None}
    if not filters:
        raise ValueError("a dismissal by query needs one of severity, ruleID, agentID")
    fields = {"severity": "severity", "ruleID": "ruleId", "agentID": "agentId"}

    def wanted(alert: SimAlert) -> bool:
        return since <= alert.created < until and all(
            str(alert.doc.get(fields[name])) == str(value) for name, value in filters.items()
        )

    return wanted


def _parse_time(text: str) -> datetime:
    parsed = datetime.fromisoformat(text)
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


class Simulator:
    def __init__(
        self,
        *,
        seed: int = 1,
        clock: Clock = utc_now,
        credentials: Credentials | None = None,
        faults: Faults | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        page_size: int = PAGE_SIZE,
        from_inclusive: bool = True,
        until_inclusive: bool = False,
    ) -> None:
        self.factory = AlertFactory(seed)
        # The vendor says "created after" / "created before" and no more: each end can be
        # switched, so tests prove the client is right whichever way the real API behaves.
        self.from_inclusive = from_inclusive
        self.until_inclusive = until_inclusive
        self.clock = clock
        self.credentials = credentials or Credentials()
        self.faults = faults or Faults()
        self.page_size = page_size
        self._fault_rng = random.Random(seed + 1)
        self._alerts: list[SimAlert] = []
        self._by_id: dict[str, SimAlert] = {}
        self._lock = threading.Lock()
        self._nonces: set[tuple[str, str, str]] = set()
        self._arrivals: deque[float] = deque()
        self.requests: list[RequestRecord] = []
        self.org_limited = 0  # requests refused by the org-wide limit
        self.faults_served: Counter[str] = Counter()
        self._served = 0  # authenticated requests, for the fault rotation
        self._served_pages = 0  # pages answered while ignoring the token
        self._listings = 0  # listing requests that reached the router
        self.holding = threading.Event()  # set while a request is held (Faults.hold_listing)
        self._release = threading.Event()
        self._server = ThreadingHTTPServer((host, port), _Handler)
        self._server.daemon_threads = True
        self._server.simulator = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Simulator:
        self._thread = threading.Thread(
            target=self._server.serve_forever, daemon=True, name="threatstack-simulator"
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def environment(self) -> dict[str, str]:
        """The SPEC environment names that point poller at this simulator."""
        return {
            "THREATSTACK_BASE_URL": self.base_url,
            "THREATSTACK_USER_ID": self.credentials.user_id,
            "THREATSTACK_ORG_ID": self.credentials.org_id,
            "THREATSTACK_API_KEY": self.credentials.api_key,
        }

    # ------------------------------------------------------------------ data
    def add(
        self,
        doc: Any,
        created: datetime,
        status: str = "active",
        visible_at: datetime | None = None,
    ) -> SimAlert:
        alert = SimAlert(doc, created, status, visible_at or created)
        with self._lock:
            self._alerts.append(alert)
            if isinstance(alert.id, str):
                self._by_id.setdefault(alert.id, alert)
        return alert

    def generate(
        self, count: int, start: datetime, end: datetime, dismissed_fraction: float = 0.3
    ) -> list[SimAlert]:
        return [
            self.add(doc, created, status)
            for doc, created, status in self.factory.spread(count, start, end, dismissed_fraction)
        ]

    def add_malformed(self, kind: str, created: datetime, status: str = "active") -> SimAlert:
        return self.add(self.factory.malformed(kind, created), created, status)

    def dismiss(
        self,
        ids: list[str] | None = None,
        reason: str = "OTHER",
        text: str | None = None,
        by: str | None = None,
        query: dict[str, Any] | None = None,
    ) -> list[SimAlert]:
        """Dismiss active alerts, as ``POST /v2/alerts/dismiss`` does (threatstack-api.md
        §3.1, §7b.3): each moves to the dismissed list, keeping its id and ``createdAt``, with
        ``isDismissed``, ``dismissedAt`` (now), ``dismissReason``, ``dismissReasonText`` and
        ``dismissedBy`` set. By ``ids``, or by ``query`` (``from``, ``until`` and one of
        ``severity``, ``ruleID``, ``agentID``). Returns the alerts dismissed now; raises
        ValueError for what the vendor documents as a bad request."""
        if reason not in DISMISS_REASONS:
            raise ValueError(f"dismissReason must be one of {', '.join(DISMISS_REASONS)}")
        if text and reason != "OTHER":
            raise ValueError("dismissReasonText goes only with dismissReason OTHER")
        if (ids is None) == (query is None):
            raise ValueError("dismiss by ids or by query (from, until and a filter)")
        wanted = _dismiss_filter(ids, query)
        moment = iso_ms(self.clock())
        done = []
        with self._lock:
            for alert in self._alerts:
                if alert.status != "active" or not isinstance(alert.doc, dict):
                    continue
                if not wanted(alert):
                    continue
                # A new object: what was served before stays as it was served.
                alert.doc = {
                    **alert.doc,
                    "isDismissed": True,
                    "dismissedAt": moment,
                    "dismissReason": reason,
                    "dismissReasonText": text if reason == "OTHER" else None,
                    "dismissedBy": by or DISMISSED_BY,
                }
                alert.status = "dismissed"
                done.append(alert)
        return done

    @property
    def alerts(self) -> list[SimAlert]:
        with self._lock:
            return list(self._alerts)

    def request_count(self, path_prefix: str = "") -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.path.startswith(path_prefix))

    def max_requests_in_any_window(self, seconds: float = 60.0) -> int:
        """The most requests that arrived within any ``seconds``-long window."""
        with self._lock:
            times = sorted(r.at for r in self.requests)
        best, start = 0, 0
        for end, moment in enumerate(times):
            while moment - times[start] >= seconds:
                start += 1
            best = max(best, end - start + 1)
        return best

    def _matching(
        self, status: str, since: datetime | None, until: datetime | None
    ) -> list[SimAlert]:
        now = self.clock()

        def after_from(created: datetime) -> bool:
            if since is None:
                return True
            return created >= since if self.from_inclusive else created > since

        def before_until(created: datetime) -> bool:
            if until is None:
                return True
            return created <= until if self.until_inclusive else created < until

        with self._lock:
            found = [
                a
                for a in self._alerts
                if a.status == status
                and a.visible_at <= now
                and after_from(a.created)
                and before_until(a.created)
            ]
        # Newest first; the API documents no order, so clients must not rely on this one.
        found.sort(key=lambda a: (a.created, str(a.id)), reverse=True)
        return found

    # ------------------------------------------------------------------ faults
    def release_hold(self) -> None:
        """Answer the request held by ``Faults.hold_listing`` (and any later one)."""
        self._release.set()

    def _maybe_hold(self) -> None:
        with self._lock:
            self._listings += 1
            hold = self.faults.hold_listing and self._listings == self.faults.hold_listing
        if hold:
            self.holding.set()
            self._release.wait(timeout=300)

    def _roll_fault(self) -> str | None:
        with self._lock:
            self._served += 1
            served = self._served
            roll = self._fault_rng.random()
        every = self.faults.every
        fault = None
        if every and served % every == 0:
            fault = FAULT_KINDS[(served // every - 1) % len(FAULT_KINDS)]
        else:
            edge = 0.0
            for kind in FAULT_KINDS:
                edge += self.faults.rate.get(kind, 0.0)
                if roll < edge:
                    fault = kind
                    break
        if fault is not None:
            with self._lock:
                self.faults_served[fault] += 1
        return fault

    def _in_storm(self) -> bool:
        with self._lock:
            if self.faults.rate_limit_storm <= 0:
                return False
            self.faults.rate_limit_storm -= 1
            self.faults_served["storm"] += 1
            return True

    def _over_org_limit(self, now: float) -> float | None:
        """Seconds until a slot frees when the org-wide limit is exhausted, else None."""
        limit = self.faults.org_limit_per_minute
        with self._lock:
            while self._arrivals and self._arrivals[0] <= now - 60:
                self._arrivals.popleft()
            if limit is not None and len(self._arrivals) >= limit:
                self.org_limited += 1
                return self._arrivals[0] + 60 - now
            self._arrivals.append(now)
        return None

    def _record(self, at: float, path: str, status: int, query: str = "") -> None:
        with self._lock:
            self.requests.append(RequestRecord(at, path, status, query))

    def _seen_nonce(self, sender_id: str, nonce: str, ts: str) -> bool:
        key = (sender_id, nonce, ts)
        with self._lock:
            if key in self._nonces:
                return True
            self._nonces.add(key)
            return False

    def _lookup(self, sender_id: str) -> dict[str, str]:
        if sender_id != self.credentials.user_id:
            raise LookupError(sender_id)
        return {"id": sender_id, "key": self.credentials.api_key, "algorithm": "sha256"}

    def _route(self, path: str, query: dict[str, list[str]]) -> tuple[int, Any]:
        parts = [p for p in path.split("/") if p]
        if parts == ["help", "hawk", "self-test"]:
            return 200, {"authenticated": True}
        if parts == ["v2", "alerts"]:
            self._maybe_hold()
            return self._list(query)
        if len(parts) >= 3 and parts[:2] == ["v2", "alerts"]:
            if parts[2] in self.faults.broken_ids:
                return 500, {"errors": ["internal error"]}
            alert = self._by_id.get(parts[2])
            if alert is None or alert.visible_at > self.clock():
                return 404, {"errors": ["alert not found"]}
            if len(parts) == 3:
                return 200, alert.doc
            if len(parts) == 4 and parts[3] == "events":
                return 200, {
                    "events": [
                        {
                            "_id": f"{parts[2]}e{i}",
                            "type": "audit",
                            "timestamp": alert.doc.get("createdAt"),
                        }
                        for i in range(2)
                    ]
                }
        if len(parts) == 3 and parts[:2] == ["v2", "agents"]:
            if parts[2] in self.factory.hostnames:
                return 200, {
                    "id": parts[2],
                    "hostname": self.factory.hostnames[parts[2]],
                    "status": "online",
                }
            return 404, {"errors": ["agent not found"]}
        return 404, {"errors": [f"no route for {path}"]}

    def _post(self, path: str, content: str) -> tuple[int, Any]:
        if [p for p in path.split("/") if p] != ["v2", "alerts", "dismiss"]:
            return 404, {"errors": [f"no route for POST {path}"]}
        try:
            request = json.loads(content)
            if not isinstance(request, dict):
                raise ValueError("the body must be a JSON object")
            ids = request.get("ids")
            query = None if ids is not None else request
            done = self.dismiss(
                ids,
                str(request.get("dismissReason", "")),
                request.get("dismissReasonText"),
                query=query,
            )
        except ValueError as exc:
            return 400, {"errors": [str(exc)]}
        # The vendor documents no answer body: this one says what was dismissed.
        return 200, {"dismissed": [alert.id for alert in done]}

    def _list(self, query: dict[str, list[str]]) -> tuple[int, Any]:
        status = (query.get("status") or [""])[0]
        if status not in ("active", "dismissed"):
            return 400, {"errors": ["status is required: active or dismissed"]}
        try:
            since = _parse_time(query["from"][0]) if "from" in query else None
            until = _parse_time(query["until"][0]) if "until" in query else None
        except ValueError:
            return 400, {"errors": ["from and until must be ISO-8601"]}
        offset, empties = 0, 0
        if "token" in query and not self.faults.ignore_token:
            try:
                fields = base64.b64decode(query["token"][0], validate=True).split(b":")
                offset = int(fields[0])
                empties = int(fields[2]) if len(fields) > 2 else 0
            except ValueError:
                return 400, {"errors": ["invalid token"]}
        found = self._matching(status, since, until)

        def token_for(at: int, empties: int = 0) -> str:
            # Standard base64 has '+', '/' and '=': clients must URL-encode it.
            return base64.b64encode(f"{at}:~{at * 7919}:{empties}".encode()).decode()

        if offset >= len(found) and offset > 0 and self.faults.endless:
            return 200, {"alerts": [], "token": token_for(offset + self.page_size)}
        if empties < self.faults.empty_pages and offset < max(len(found), 1):
            return 200, {"alerts": [], "token": token_for(offset, empties + 1)}
        page = found[offset : offset + self.page_size]
        docs = [a.doc for a in page]
        if self.faults.duplicates_across_pages and offset >= self.page_size:
            docs = [a.doc for a in found[offset - 3 : offset]] + docs
        if self.faults.shuffle_pages:
            with self._lock:
                self._fault_rng.shuffle(docs)
        next_offset = offset + self.page_size
        token = None
        if self.faults.ignore_token:
            with self._lock:
                self._served_pages += 1
                token = base64.b64encode(f"fresh:{self._served_pages}".encode()).decode()
        elif next_offset < len(found) or self.faults.endless:
            token = token_for(next_offset)
        return 200, {"alerts": docs, "token": token}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ThreatStackSimulator/1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        log.debug("simulator " + format, *args)

    @property
    def sim(self) -> Simulator:
        return self.server.simulator  # type: ignore[attr-defined,no-any-return]

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
        cut_short: bool = False,
    ) -> None:
        # Counted before the answer leaves, so a client that has its answer sees the count.
        self.sim._record(self._arrived, self._request_path, status, self._query)
        headers = dict(headers or {})
        if self.sim.faults.compress:
            body, coding = _gateway_encode(
                body, self.sim.faults.compress, self.headers.get("Accept-Encoding", "")
            )
            if coding:
                headers["Content-Encoding"] = coding
        length = len(body)
        if cut_short:  # the length promises the whole body; half of it is sent
            body = body[: len(body) // 2]
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        trickle = self.sim.faults.trickle_seconds
        if trickle > 0 and status == 200 and body:
            step = max(1, len(body) // 20)
            for start in range(0, len(body), step):
                try:
                    self.wfile.write(body[start : start + step])
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    return  # the client gave up, as it should
                time.sleep(trickle / 20)
        else:
            self.wfile.write(body)

    def do_GET(self) -> None:
        sim = self.sim
        self._arrived = time.time()
        url = f"http://{self.headers.get('Host', '')}{self.path}"
        split = urlsplit(self.path)
        self._request_path = split.path
        self._query = split.query
        self._serve(sim, self._arrived, url, split.path, parse_qs(split.query))

    def do_POST(self) -> None:
        """``POST /v2/alerts/dismiss`` only; the body is Hawk-hashed as ``application/json``."""
        sim = self.sim
        self._arrived = time.time()
        url = f"http://{self.headers.get('Host', '')}{self.path}"
        split = urlsplit(self.path)
        self._request_path = split.path
        self._query = split.query
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        self._serve(sim, self._arrived, url, split.path, {}, "POST", body)

    def _serve(
        self,
        sim: Simulator,
        arrived: float,
        url: str,
        path: str,
        query: dict[str, list[str]],
        method: str = "GET",
        content: str = "",
    ) -> int:
        wait = sim._over_org_limit(arrived)
        if wait is not None:
            self._send(
                429,
                b"Too Many Requests",
                "text/plain",
                {"x-rate-limit-remaining": "0", "x-rate-limit-reset": str(int(wait * 1000) + 1)},
            )
            return 429
        try:
            receiver = mohawk.Receiver(
                sim._lookup,
                self.headers.get("Authorization"),
                url,
                method,
                content=content,
                content_type=self.headers.get("Content-Type", "") if content else "",
                seen_nonce=sim._seen_nonce,
            )
        except (mohawk.exc.HawkFail, LookupError) as exc:
            extra = {}
            if isinstance(exc, mohawk.exc.TokenExpired):
                extra["WWW-Authenticate"] = exc.www_authenticate
            self._send(
                401,
                json.dumps({"errors": [f"Unauthorized: {type(exc).__name__}"]}).encode(),
                headers=extra,
            )
            return 401
        if receiver.parsed_header.get("ext") != sim.credentials.org_id:
            self._send(401, b'{"errors": ["Unauthorized: unknown organization"]}')
            return 401

        fault = sim._roll_fault()
        if fault == "429" or sim._in_storm():
            self._send(
                429,
                b"Too Many Requests",
                "text/plain",
                {"x-rate-limit-remaining": "0", "x-rate-limit-reset": sim.faults.rate_limit_reset},
            )
            return 429
        if fault in ("500", "502", "503"):
            self._send(int(fault), b"<html><body>upstream error</body></html>", "text/html")
            return int(fault)
        if fault == "drop":
            sim._record(arrived, path, 0, self._query)
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return 0
        if fault == "slow":
            time.sleep(sim.faults.slow_seconds)

        if method == "POST":
            status, document = sim._post(path, content)
        else:
            status, document = sim._route(path, query)
        body = json.dumps(document).encode()
        headers = {"x-rate-limit-remaining": "150", "x-rate-limit-reset": "30000"}
        if status == 200:
            headers["Server-Authorization"] = receiver.respond(
                content=body, content_type="application/json"
            )
        if fault == "truncate":
            self._send(status, body, headers=headers, cut_short=True)
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return status
        if fault == "bad_json":
            # A 200 whose body is cut short but whose length agrees: only parsing sees it.
            body = body[: len(body) // 2]
            headers["Server-Authorization"] = receiver.respond(
                content=body, content_type="application/json"
            )
        self._send(status, body, headers=headers)
        return status
