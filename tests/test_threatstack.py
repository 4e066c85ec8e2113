"""The Threat Stack client against `responses`: Hawk, paging, and every error class."""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import mohawk
import pytest
import requests
import responses
from pydantic import SecretStr
from responses import registries

from poller.config import ThreatStackSettings
from poller.errors import (
    ApiAuthError,
    ApiRequestError,
    ApiUnavailable,
    FatalError,
    MalformedResponse,
    PagingLoop,
    RateLimited,
)
from poller.threatstack.budget import RequestBudget
from poller.threatstack.client import ThreatStackClient
from poller.threatstack.retrying import RetryPolicy
from poller.timeutil import parse_instant, utc_now

BASE = "https://api.example.test"
SETTINGS = ThreatStackSettings(
    base_url=BASE, user_id="user-1", org_id="org-1", api_key=SecretStr("k" * 40)
)
SINCE = parse_instant("2026-11-24T00:00:00Z", utc_now())
UNTIL = parse_instant("2026-11-25T00:00:00Z", utc_now())


def make_client(settings: ThreatStackSettings = SETTINGS) -> tuple[ThreatStackClient, list[float]]:
    sleeps: list[float] = []
    client = ThreatStackClient(
        settings,
        requests.Session(),
        RequestBudget(10_000, sleep=sleeps.append),
        RetryPolicy(max_attempts=4),
        sleeps.append,
    )
    return client, sleeps


def signed(request: Any, status: int, document: Any) -> tuple[int, dict[str, str], str]:
    """Verify the request's Hawk header as the server would, and sign the response."""
    receiver = mohawk.Receiver(
        lambda _id: {"id": "user-1", "key": "k" * 40, "algorithm": "sha256"},
        request.headers["Authorization"],
        request.url,
        "GET",
        content="",
        content_type="",
        seen_nonce=lambda *_: False,
    )
    assert receiver.parsed_header["ext"] == "org-1"
    body = json.dumps(document)
    header = receiver.respond(content=body, content_type="application/json")
    return status, {"Server-Authorization": header, "Content-Type": "application/json"}, body


def pages(tokens: list[Any], per_page: int = 2):
    """A callback serving pages whose next tokens are ``tokens`` in turn."""
    served = {"n": 0}

    def callback(request: Any) -> tuple[int, dict[str, str], str]:
        n = served["n"]
        served["n"] += 1
        alerts = [{"id": f"alert{n}{i:020d}"} for i in range(per_page)]
        return signed(request, 200, {"alerts": alerts, "token": tokens[n]})

    return callback


@responses.activate
def test_pages_until_token_ends_and_signs_the_exact_url():
    responses.add_callback(responses.GET, f"{BASE}/v2/alerts", callback=pages(["a+b/c==", None]))
    budget = RequestBudget(10_000)
    client = ThreatStackClient(SETTINGS, requests.Session(), budget, RetryPolicy(), time.sleep)
    got = list(client.list_alerts("active", SINCE, UNTIL))
    assert [len(p) for p in got] == [2, 2]
    first, second = (urlsplit(c.request.url) for c in responses.calls)
    assert parse_qs(first.query) == {
        "status": ["active"],
        "from": ["2026-11-24T00:00:00"],
        "until": ["2026-11-25T00:00:00"],
    }
    assert "token=a%2Bb%2Fc%3D%3D" in second.query  # URL-encoded, and signed as sent
    assert second.query.startswith("status=active&from=2026-11-24T00%3A00%3A00")
    assert budget.sent == 2  # the budget is the one count of API requests


@pytest.mark.parametrize("end", [None, ""])
@responses.activate
def test_null_or_empty_token_ends_paging(end: Any):
    responses.add_callback(responses.GET, f"{BASE}/v2/alerts", callback=pages(["t1", end]))
    client, _ = make_client()
    assert len(list(client.list_alerts("dismissed", SINCE, UNTIL))) == 2


@responses.activate
def test_a_repeated_token_is_an_error_not_a_loop():
    responses.add_callback(
        responses.GET, f"{BASE}/v2/alerts", callback=pages(["t1", "t2", "t1", "t2"])
    )
    client, _ = make_client()
    with pytest.raises(PagingLoop):
        list(client.list_alerts("active", SINCE, UNTIL))
    assert len(responses.calls) == 3


@responses.activate(registry=registries.OrderedRegistry)
def test_each_retry_is_signed_afresh():
    responses.add(responses.GET, f"{BASE}/v2/alerts", status=503)
    responses.add_callback(responses.GET, f"{BASE}/v2/alerts", callback=pages([None]))
    client, sleeps = make_client()
    list(client.list_alerts("active", SINCE, UNTIL))
    first, second = (c.request.headers["Authorization"] for c in responses.calls)
    assert first != second
    assert len(sleeps) == 1


@pytest.mark.parametrize(
    ("status", "body", "error", "attempts"),
    [
        (400, '{"errors": ["from must be before until"]}', ApiRequestError, 1),
        (401, '{"errors": ["Unauthorized"]}', ApiAuthError, 1),
        (403, '{"errors": ["Forbidden"]}', ApiAuthError, 1),
        (404, "not json", ApiRequestError, 1),
        (429, "Too Many Requests", RateLimited, 4),  # a 429 body is never parsed
        (500, '{"errors": ["boom"]}', ApiUnavailable, 4),
        (502, "<html>bad gateway</html>", ApiUnavailable, 4),
        (503, "", ApiUnavailable, 4),
    ],
)
@responses.activate
def test_http_errors_are_classified_and_retried_only_when_transient(
    status: int, body: str, error: type, attempts: int
):
    responses.add(responses.GET, f"{BASE}/v2/alerts", status=status, body=body)
    client, _ = make_client()
    with pytest.raises(error) as caught:
        list(client.list_alerts("active", SINCE, UNTIL))
    assert len(responses.calls) == attempts
    assert "k" * 40 not in str(caught.value)


@responses.activate
def test_401_message_names_credentials_and_clock():
    responses.add(responses.GET, f"{BASE}/v2/alerts", status=401, body='{"errors": ["nope"]}')
    client, _ = make_client()
    with pytest.raises(ApiAuthError, match=r"THREATSTACK_API_KEY.*clock"):
        list(client.list_alerts("active", SINCE, UNTIL))


@pytest.mark.parametrize(
    "document", [["a", "list"], {"alerts": "nope"}, {"token": None}, {"alerts": [], "token": {}}]
)
@responses.activate
def test_malformed_pages_are_retried_then_fail(document: Any):
    responses.add_callback(
        responses.GET, f"{BASE}/v2/alerts", callback=lambda r: signed(r, 200, document)
    )
    client, _ = make_client()
    with pytest.raises(MalformedResponse):
        list(client.list_alerts("active", SINCE, UNTIL))
    assert len(responses.calls) == 4


@responses.activate
def test_non_json_200_is_malformed():
    responses.add(responses.GET, f"{BASE}/v2/alerts", status=200, body="<html>maintenance</html>")
    client, _ = make_client(ThreatStackSettings(**{**SETTINGS.__dict__, "verify_responses": False}))
    with pytest.raises(MalformedResponse, match="not JSON"):
        list(client.list_alerts("active", SINCE, UNTIL))


@responses.activate
def test_a_response_with_a_bad_signature_is_refused():
    def forged(request: Any) -> tuple[int, dict[str, str], str]:
        status, headers, _ = signed(request, 200, {"alerts": [], "token": None})
        return status, headers, json.dumps({"alerts": [{"id": "injected0000"}], "token": None})

    responses.add_callback(responses.GET, f"{BASE}/v2/alerts", callback=forged)
    client, _ = make_client()
    with pytest.raises(MalformedResponse, match="signature"):
        list(client.list_alerts("active", SINCE, UNTIL))


@responses.activate
def test_timeouts_and_dropped_connections_are_retried():
    responses.add(
        responses.GET,
        f"{BASE}/help/hawk/self-test",
        body=requests.exceptions.ConnectTimeout("slow"),
    )
    client, sleeps = make_client()
    with pytest.raises(ApiUnavailable, match="did not answer"):
        client.self_test()
    assert len(responses.calls) == 4
    assert len(sleeps) == 3


@responses.activate
def test_self_test_has_no_v2_prefix():
    responses.add_callback(
        responses.GET,
        f"{BASE}/help/hawk/self-test",
        callback=lambda r: signed(r, 200, {"authenticated": True}),
    )
    client, _ = make_client()
    assert client.self_test() == {"authenticated": True}


def test_client_repr_has_no_secret():
    client, _ = make_client()
    assert "k" * 40 not in repr(client)


@responses.activate
def test_an_unsigned_success_is_refused_at_once_with_the_way_out():
    responses.add(responses.GET, f"{BASE}/v2/alerts", json={"alerts": [], "token": None})
    client, _ = make_client()
    with pytest.raises(FatalError, match="verify_responses"):
        list(client.list_alerts("active", SINCE, UNTIL))
    assert len(responses.calls) == 1


@responses.activate
def test_a_server_that_ignores_the_token_fails_the_listing_instead_of_looping():
    """Every answer is page one with a fresh token: three pages in a row that bring nothing
    new end the listing with a PagingLoop, after a bounded number of requests."""
    served = {"n": 0}

    def page_one_forever(request: Any) -> tuple[int, dict[str, str], str]:
        served["n"] += 1
        alerts = [{"id": f"alert{i:020d}"} for i in range(3)]
        return signed(request, 200, {"alerts": alerts, "token": f"fresh-{served['n']}"})

    responses.add_callback(responses.GET, f"{BASE}/v2/alerts", callback=page_one_forever)
    client, _ = make_client()
    with pytest.raises(PagingLoop, match="paging went wrong: 3 pages in a row"):
        for _ in client.list_alerts("active", SINCE, UNTIL):
            assert served["n"] < 10, "paging did not stop"
    assert served["n"] == 4


@responses.activate
def test_pages_with_some_repeats_are_progress():
    """Repeats across pages (the API may shift while paging) are fine while anything is new."""
    served = {"n": 0}

    def overlapping(request: Any) -> tuple[int, dict[str, str], str]:
        n = served["n"]
        served["n"] += 1
        alerts = [{"id": f"alert{i:020d}"} for i in range(n, n + 3)]  # two repeats, one new
        return signed(request, 200, {"alerts": alerts, "token": f"t{n}" if n < 8 else None})

    responses.add_callback(responses.GET, f"{BASE}/v2/alerts", callback=overlapping)
    client, _ = make_client()
    assert len(list(client.list_alerts("active", SINCE, UNTIL))) == 9


@responses.activate
def test_a_body_over_the_size_bound_is_refused_without_keeping_it():
    settings = ThreatStackSettings(**{**SETTINGS.__dict__, "max_response_bytes": 1024})

    def big(request: Any) -> tuple[int, dict[str, str], str]:
        return signed(request, 200, {"alerts": [{"id": "x" * 2000}], "token": None})

    responses.add_callback(responses.GET, f"{BASE}/v2/alerts", callback=big)
    client, _ = make_client(settings)
    with pytest.raises(MalformedResponse, match="over 1024 bytes"):
        list(client.list_alerts("active", SINCE, UNTIL))
    assert len(responses.calls) == 4  # retried (a proxy hiccup may pass), then given up
