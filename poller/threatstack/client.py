"""The Threat Stack v2 API client: Hawk auth, token paging, classification of every response.

Facts this rests on are in ``../shared/threatstack-api.md``: §1 (Hawk: id = user id,
key = API key, sha256, org id in ``ext``; sign exactly the URL sent), §2 (``/v2/alerts``
paging with ``token``; ``null`` or ``""`` ends), §4 (429 bodies are not JSON).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import mohawk
import mohawk.exc
import requests
import urllib3.exceptions

from poller import __version__
from poller.config import ThreatStackSettings
from poller.errors import (
    ApiAuthError,
    ApiRequestError,
    ApiUnavailable,
    FatalError,
    MalformedResponse,
    NotFound,
    PagingLoop,
    PollerError,
    RateLimited,
)
from poller.threatstack.budget import RequestBudget, retry_after_seconds
from poller.threatstack.decoding import ACCEPT_ENCODING, BodyDecoder
from poller.threatstack.retrying import RATE_LIMIT_FLOOR, RetryPolicy
from poller.timeutil import api_format

log = logging.getLogger(__name__)

USER_AGENT = f"poller/{__version__} (+threatstack-archiver)"
Validator = Callable[[Any], None]

# Pages in a row that bring alerts, all of them brought before, before paging is declared
# broken (a server or proxy that ignores ``token`` answers page one forever).
STALE_PAGE_LIMIT = 3
# Empty pages that still carry a next token are allowed (nothing says the API never sends
# them), but not without end: a run this long fails the listing with PagingLoop. It matches
# the pages a listing is given time for (walks.sync.PAGES_PER_LISTING), so a cycle meets
# either this clear error or its own deadline, never an endless listing.
EMPTY_PAGE_LIMIT = 100
READ_SIZE = 64 * 1024
# A 4xx answer's body is read for its error text alone (the first 300 characters are shown).
ERROR_BODY_BYTES = 64 * 1024


class Page(list[Any]):
    """One page of a listing; ``last`` is True when no page follows, so a reader that must
    stop at a page count (the revisit's share of the budget) knows whether the listing is
    over without asking for the next page."""

    def __init__(self, alerts: list[Any], last: bool) -> None:
        super().__init__(alerts)
        self.last = last


def _identity(raw: Any) -> str:
    """What makes an object on a page "new": its id, else a hash of its content."""
    if isinstance(raw, dict) and isinstance(raw.get("id"), str):
        return "id:" + str(raw["id"])
    text = json.dumps(raw, sort_keys=True, default=str)
    return "h:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _server_errors(raw: bytes) -> str:
    """The ``{"errors": [...]}`` text of a v2 error body, if there is one (never raises)."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return ""
    if isinstance(body, dict):
        errors = body.get("errors") or body.get("message")
        if isinstance(errors, list):
            return "; ".join(str(e) for e in errors)[:300]
        if isinstance(errors, str):
            return errors[:300]
    return ""


def classify_response(response: requests.Response, body: bytes = b"") -> PollerError | None:
    """The one place an HTTP status becomes an error (None for success); ``body``, the
    answer's decoded body as far as it was read, only adds the server's words to a 4xx."""
    status = response.status_code
    if 200 <= status < 300:
        return None
    if status == 429:
        # The body of a 429 is not JSON (threatstack-api.md §4.1.4): only headers are read.
        return RateLimited(
            "Threat Stack rate limit hit (429)", retry_after_seconds(response.headers)
        )
    if status >= 500:
        return ApiUnavailable(f"Threat Stack answered {status}")
    detail = _server_errors(body)
    suffix = f": {detail}" if detail else ""
    if status == 401:
        skew = (
            " The server reports a clock difference."
            if "ts=" in response.headers.get("WWW-Authenticate", "")
            else ""
        )
        return ApiAuthError(
            "Threat Stack rejected the Hawk credentials (401)"
            f"{suffix}. Check THREATSTACK_USER_ID, THREATSTACK_ORG_ID and THREATSTACK_API_KEY,"
            f" and that this machine's clock is right (Hawk allows about 60 s).{skew}"
        )
    if status == 403:
        return ApiAuthError(
            f"Threat Stack refused access (403){suffix}: the API key's user lacks permission"
            " to read alerts in this organisation"
        )
    if status == 404:
        return NotFound(f"Threat Stack has no such object (404){suffix}")
    return ApiRequestError(f"Threat Stack rejected the request ({status}){suffix}")


class ThreatStackClient:
    """Reads alerts. Every attempt passes the shared budget and is signed afresh."""

    def __init__(
        self,
        settings: ThreatStackSettings,
        session: requests.Session,
        budget: RequestBudget,
        retry: RetryPolicy,
        sleep: Callable[[float], None],
    ) -> None:
        self._settings = settings
        self._session = session
        self._budget = budget
        self._retry = retry
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"ThreatStackClient(base_url={self._settings.base_url!r}, user_id=..., api_key=***)"

    def url(self, path: str, params: list[tuple[str, str]]) -> str:
        """The exact URL that is both signed and sent (threatstack-api.md §1.2)."""
        query = urlencode(params)
        return f"{self._settings.base_url}{path}" + (f"?{query}" if query else "")

    def list_alerts(self, status: str, since: datetime, until: datetime) -> Iterator[list[Any]]:
        """Yield ``/v2/alerts`` page by page (each a ``Page``) for one status and the window
        [since, until).

        Paging must make progress: a repeated token, STALE_PAGE_LIMIT pages in a row whose
        alerts all came before, or EMPTY_PAGE_LIMIT empty pages in a row, raise PagingLoop
        instead of looping forever. Shorter runs of empty pages with a next token are read
        through. The sets this keeps are one listing's (one chunk, one status)."""
        params = [("status", status), ("from", api_format(since)), ("until", api_format(until))]
        seen_tokens: set[str] = set()
        seen_items: set[str] = set()
        stale_pages = empty_pages = 0
        token: str | None = None
        page_number = 0
        while True:
            page_params = params + ([("token", token)] if token else [])
            document = self._get_json("/v2/alerts", page_params, _validate_alert_page)
            page_number += 1
            before = len(seen_items)
            seen_items.update(_identity(raw) for raw in document["alerts"])
            next_token = document.get("token")
            last = next_token is None or next_token == ""
            yield Page(document["alerts"], last)
            if last:
                return
            window = f"window {api_format(since)}..{api_format(until)}"
            empty_pages = empty_pages + 1 if not document["alerts"] else 0
            if empty_pages >= EMPTY_PAGE_LIMIT:
                raise PagingLoop(
                    f"paging went wrong: {empty_pages} empty pages in a row of status={status},"
                    f" each with a next token (page {page_number}, {window}); the listing"
                    " looks endless. Stopping instead of looping"
                )
            repeats_only = document["alerts"] and len(seen_items) == before
            stale_pages = stale_pages + 1 if repeats_only else 0
            if stale_pages >= STALE_PAGE_LIMIT:
                raise PagingLoop(
                    f"paging went wrong: {stale_pages} pages in a row of status={status}"
                    f" brought no alert that earlier pages had not (page {page_number},"
                    f" {window}); a server or proxy may be ignoring the page token."
                    " Stopping instead of looping"
                )
            token = str(next_token)
            if token in seen_tokens:
                raise PagingLoop(
                    f"Threat Stack repeated a page token on page {page_number} of"
                    f" status={status}; stopping instead of looping"
                )
            seen_tokens.add(token)

    def get_alert(self, alert_id: str) -> Any:
        """``GET /v2/alerts/{id}``: one alert's full record (the push path's detail fetch)."""
        return self._get_json(f"/v2/alerts/{alert_id}", [], _validate_alert)

    def self_test(self) -> Any:
        """``GET /help/hawk/self-test`` (no ``/v2`` prefix): proves the credentials work."""
        return self._get_json("/help/hawk/self-test", [], lambda _: None)

    def _get_json(self, path: str, params: list[tuple[str, str]], validate: Validator) -> Any:
        url = self.url(path, params)
        return self._retry.call(lambda: self._attempt(url, validate), self._sleep, f"GET {path}")

    def _attempt(self, url: str, validate: Validator) -> Any:
        self._budget.acquire()
        settings = self._settings
        sender = mohawk.Sender(
            {
                "id": settings.user_id,
                "key": settings.api_key.get_secret_value(),
                "algorithm": "sha256",
            },
            url,
            "GET",
            always_hash_content=False,
            ext=settings.org_id,
        )
        started = time.monotonic()
        try:
            response = self._session.get(
                url,
                headers={
                    "Authorization": sender.request_header,
                    "Accept": "application/json",
                    "Accept-Encoding": ACCEPT_ENCODING,
                    "User-Agent": USER_AGENT,
                },
                timeout=settings.timeout_seconds,
                stream=True,  # the body is read by _read_body, within its bounds
            )
        except requests.Timeout as exc:
            raise ApiUnavailable(
                f"Threat Stack did not answer within {settings.timeout_seconds}s"
            ) from exc
        except requests.RequestException as exc:
            # Dropped connections and resets land here.
            raise ApiUnavailable(
                f"connection to Threat Stack failed ({type(exc).__name__})"
            ) from exc
        with response:
            self._budget.observe(response.headers)
            said = b""
            if 400 <= response.status_code < 500 and response.status_code != 429:
                said = self._error_body(response, started)
            error = classify_response(response, said)
            if isinstance(error, RateLimited):
                # Every request of this process holds back, at least for the floor.
                self._budget.pause(max(error.retry_after or 0.0, RATE_LIMIT_FLOOR))
            if error is not None:
                raise error
            body = self._read_body(response, started)
        if settings.verify_responses:
            self._verify(sender, response, body)
        try:
            document = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise MalformedResponse(
                f"Threat Stack answered {response.status_code} with a body that is not JSON"
                f" ({len(body)} bytes)"
            ) from exc
        validate(document)
        return document

    def _error_body(self, response: requests.Response, started: float) -> bytes:
        """A 4xx answer's body, for the server's words only: read within the same bounds as
        any body but at most ERROR_BODY_BYTES (decoded), and b"" when it does not read (too
        big, not decodable, cut short). The status decides the error, never the body."""
        try:
            return self._read_body(response, started, ERROR_BODY_BYTES)
        except PollerError:
            return b""

    def _read_body(
        self, response: requests.Response, started: float, limit: int | None = None
    ) -> bytes:
        """The whole body, decoded (gzip, deflate), or an error: never longer than
        ``request_deadline_seconds`` from the request's start (a body that trickles in), never
        more than ``max_response_bytes`` (or ``limit``) on the wire nor once decoded. Each
        socket read is bounded by ``timeout_seconds``."""
        limit = limit if limit is not None else self._settings.max_response_bytes
        deadline = started + self._settings.request_deadline_seconds
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise MalformedResponse(f"Threat Stack announced a body over {limit} bytes")
        decoder = BodyDecoder(response.headers.get("Content-Encoding", ""), limit)
        parts: list[bytes] = []
        size = 0
        try:
            # What one recv brings (urllib3 >= 2.2), as sent: decoding is ours, bounded.
            while chunk := response.raw.read1(READ_SIZE, decode_content=False):
                size += len(chunk)
                if size > limit:
                    raise MalformedResponse(f"Threat Stack sent a body over {limit} bytes")
                if time.monotonic() > deadline:
                    raise ApiUnavailable(
                        "Threat Stack's answer did not finish within"
                        f" {self._settings.request_deadline_seconds:g}s"
                        f" ({size} bytes so far)"
                    )
                parts.append(decoder.feed(chunk))
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
            # Bodies cut short, resets and read timeouts in the middle of the body.
            raise ApiUnavailable(
                f"Threat Stack's answer was cut short ({type(exc).__name__})"
            ) from exc
        if size:
            decoder.finish()
        return b"".join(parts)

    @staticmethod
    def _verify(sender: mohawk.Sender, response: requests.Response, body: bytes) -> None:
        header = response.headers.get("Server-Authorization")
        if not header:
            # Not transient: an endpoint that does not sign will never sign on a retry.
            raise FatalError(
                "Threat Stack's response carries no Server-Authorization header; if this"
                " endpoint does not sign its responses, set threatstack.verify_responses: false"
            )
        try:
            sender.accept_response(
                header, content=body, content_type=response.headers.get("Content-Type", "")
            )
        except (mohawk.exc.HawkFail, KeyError, ValueError) as exc:
            # A body cut short fails the payload hash too, so this is worth a retry.
            raise MalformedResponse(
                f"Threat Stack response signature did not verify ({type(exc).__name__})"
            ) from exc


def _validate_alert(document: Any) -> None:
    if not isinstance(document, dict):
        raise MalformedResponse("Threat Stack alert is not a JSON object")


def _validate_alert_page(document: Any) -> None:
    if not isinstance(document, dict) or not isinstance(document.get("alerts"), list):
        raise MalformedResponse("Threat Stack alert page is not an object with an 'alerts' list")
    token = document.get("token")
    if token is not None and not isinstance(token, (str, int)):
        raise MalformedResponse("Threat Stack alert page has a token that is not a string")
