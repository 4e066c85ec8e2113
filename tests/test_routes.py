"""The push path's route policy, route by route, through Flask's test client (no socket)."""

from __future__ import annotations

import gzip
import json
import threading
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from poller.archive.reading import archived_webhooks
from poller.archive.records import Layout
from poller.archive.store import MemoryObjectStore
from poller.config import ReceiverSettings
from poller.serving.http import CachedStatus, PushParts, _is_sns_host, build_app
from poller.serving.pushes import PushRejected, decode_body
from poller.serving.receiver import Receiver

PUSH, OLD, READ = (
    "push-token-aaaaaaaaaaaaaaaa",
    "old-token-bbbbbbbbbbbbbbbb",
    "read-token-cccccccccccc",
)
ORG = "5f1e000000000000000000aa"
ALERT = {"id": "abcd1234", "created_at": 1764505224000, "severity": 1, "organization_id": ORG}


def client(read_token: str = READ, calls: list[str] | None = None) -> Any:
    settings = ReceiverSettings(
        token=SecretStr(PUSH), previous_token=SecretStr(OLD), read_token=SecretStr(read_token)
    )
    seen = calls if calls is not None else []

    def status() -> dict[str, Any]:
        seen.append("status")
        return {"success": True}

    parts = PushParts(
        settings=settings,
        organization_id=ORG,
        receiver=Receiver(MemoryObjectStore(), Layout(""), ORG, None),
        read_object=lambda alert_id: {"id": alert_id},
        list_webhooks=lambda start, end, limit: [],
        status=CachedStatus(status),
        confirm_subscription=lambda url: None,
    )
    return build_app(CollectorRegistry(), push=parts).test_client()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("prefix", ["", "/threatstack-to-s3"])
@pytest.mark.parametrize(
    ("method", "path", "headers", "expected"),
    [
        ("GET", "/api/v1/s3/status", {}, 200),
        ("POST", f"/api/v1/s3/alert/{PUSH}", {}, 200),
        ("POST", f"/api/v1/s3/alert/{OLD}", {}, 200),  # during a rotation
        ("POST", "/api/v1/s3/alert", bearer(PUSH), 200),
        ("POST", "/api/v1/s3/alert/wrong-token", {}, 401),
        ("POST", "/api/v1/s3/alert", {}, 401),
        ("POST", f"/api/v1/s3/alert/{READ}", {}, 401),  # the read token never pushes
        ("GET", "/api/v1/s3/alert/abcd1234", bearer(READ), 200),
        ("GET", "/api/v1/s3/alert/abcd1234", bearer(PUSH), 401),  # the push token never reads
        ("GET", "/api/v1/s3/alert/abcd1234", {}, 401),
        ("GET", "/api/v1/s3/alert?start=2026-11-01&end=2026-11-02", bearer(READ), 200),
        ("GET", "/api/v1/s3/alert?start=2026-11-01&end=2026-11-02", bearer(PUSH), 401),
        ("GET", "/api/v1/s3/alert?start=1996-01-01&end=2026-01-01", bearer(READ), 400),
        ("DELETE", "/api/v1/s3/alert", bearer(PUSH), 405),
        ("GET", "/api/v1/s3/elsewhere", {}, 404),
    ],
)
def test_each_route_admits_exactly_its_callers(
    prefix: str, method: str, path: str, headers: dict[str, str], expected: int
):
    answer = client().open(prefix + path, method=method, json=ALERT, headers=headers)
    assert answer.status_code == expected, answer.get_json()


def test_read_routes_are_off_without_a_read_token():
    answer = client(read_token="").get("/api/v1/s3/alert/abcd1234", headers=bearer(PUSH))
    assert answer.status_code == 404 and "read_token" in answer.get_json()["error"]


def test_thirty_status_calls_compute_the_state_once():
    calls: list[str] = []
    test_client = client(calls=calls)
    for _ in range(30):
        assert test_client.get("/api/v1/s3/status").status_code == 200
    assert calls == ["status"]


def test_cached_status_refreshes_after_a_minute():
    now = [0.0]
    values = iter([{"n": 1}, {"n": 2}])
    status = CachedStatus(lambda: next(values), monotonic=lambda: now[0])
    assert status() == {"n": 1}
    now[0] = 59.0
    assert status() == {"n": 1}
    now[0] = 60.0
    assert status() == {"n": 2}


def test_a_wrong_token_in_a_path_is_never_logged(caplog: pytest.LogCaptureFixture):
    caplog.set_level("INFO")
    client().post("/api/v1/s3/alert/some-wrong-secret-123/extra", json=ALERT)
    client().post("/api/v1/s3/alert/another-wrong-secret", json=ALERT)
    text = " ".join(str(getattr(r, "fields", "")) for r in caplog.records)
    assert "wrong-secret" not in text and "/api/v1/s3/alert" in text


def test_forwarded_for_is_honoured_only_from_trusted_proxies():
    settings = ReceiverSettings(
        token=SecretStr(PUSH), allow_cidrs=("203.0.113.0/24",), trusted_proxies=("10.0.0.0/8",)
    )
    parts = PushParts(
        settings, ORG, Receiver(MemoryObjectStore(), Layout(""), ORG, None),
        lambda i: None, lambda s, e, n: [], lambda: {}, lambda u: None,
    )  # fmt: skip
    app = build_app(CollectorRegistry(), push=parts).test_client()
    url = f"/api/v1/s3/alert/{PUSH}"
    via_proxy = {"REMOTE_ADDR": "10.1.2.3"}
    forwarded = {"X-Forwarded-For": "203.0.113.7"}
    assert app.post(url, json=ALERT, headers=forwarded, environ_base=via_proxy).status_code == 200
    stranger = {"REMOTE_ADDR": "198.51.100.9"}
    assert app.post(url, json=ALERT, headers=forwarded, environ_base=stranger).status_code == 403
    assert app.post(url, json=ALERT, environ_base=via_proxy).status_code == 403


# ---------------------------------------------------------------------- found by review (break18)
def _app_and_store() -> tuple[Any, MemoryObjectStore]:
    store = MemoryObjectStore()
    parts = PushParts(
        ReceiverSettings(token=SecretStr(PUSH), read_token=SecretStr(READ)), ORG,
        Receiver(store, Layout(""), ORG, None), lambda i: None,
        lambda s, e, n: archived_webhooks(store, Layout(""), s, e, n), lambda: {},
        lambda u: None,
    )  # fmt: skip
    return build_app(CollectorRegistry(), push=parts).test_client(), store


def test_no_status_caller_waits_for_another_callers_check():
    """During an API outage the first check takes the whole retry policy: callers queued
    behind it held every worker (``/healthz`` on the same listener too)."""
    release = threading.Event()

    def slow() -> dict[str, Any]:
        release.wait(10)
        return {"success": True}

    status = CachedStatus(slow, provisional={"success": False, "checking": True})
    first = threading.Thread(target=status)
    first.start()
    time.sleep(0.1)
    started = time.monotonic()
    assert status() == {"success": False, "checking": True}  # at once, not after the check
    assert time.monotonic() - started < 1
    release.set()
    first.join()
    assert status() == {"success": True}


@pytest.mark.parametrize(
    ("host", "sns"),
    [
        ("sns.us-east-1.amazonaws.com", True),
        ("sns.us-gov-west-1.amazonaws.com", True),
        ("sns.cn-north-1.amazonaws.com.cn", True),
        ("sns.attacker-bucket.s3.amazonaws.com", False),  # an S3 bucket named sns.attacker-...
        ("sns.x.s3-website-us-east-1.amazonaws.com", False),  # a website bucket redirects
        ("sns.us-east-1.amazonaws.com.evil.example", False),
    ],
)
def test_only_sns_itself_is_an_sns_host(host: str, sns: bool):
    assert _is_sns_host(host) is sns


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/s3//alert/typo-of-the-token-123",  # a base URL with a trailing slash
        "/api/v1/s3/alerts/typo-of-the-token-123",
        "/threatstack-to-s3/api/v1/s3/alert/typo-of-the-token-123/x",
        "/typo-of-the-token-123",
    ],
)
def test_a_wrong_token_in_any_shape_of_path_is_never_logged(
    path: str, caplog: pytest.LogCaptureFixture
):
    caplog.set_level("INFO")
    client().post(path, json=ALERT)
    text = " ".join(str(getattr(r, "fields", "")) for r in caplog.records)
    assert "typo-of-the-token" not in text and "***" in text


def test_a_number_too_long_for_int_quarantines_its_alert_only():
    app, store = _app_and_store()
    body = '{"alerts": [{"id": "goodalert", "created_at": 1764505224000}, {"id": "badnumber",'
    body += ' "created_at": ' + "9" * 5000 + "}]}"
    answer = app.post(f"/api/v1/s3/alert/{PUSH}", data=body, content_type="application/json")
    assert answer.status_code == 200, answer.get_json()
    assert [r["result"] for r in answer.get_json()["results"]] == ["archived", "quarantined"]
    assert any(k.startswith("_poller/quarantine/bad_created_at/") for k in store.list_keys(""))


def test_one_id_twice_in_a_batch_names_one_webhook_key():
    app, store = _app_and_store()
    twice = {"alerts": [{"id": "dupalert", "created_at": 1764505224000},
                        {"id": "dupalert", "created_at": 1764505224000 + 120_000}]}  # fmt: skip
    answer = app.post(f"/api/v1/s3/alert/{PUSH}", json=twice)
    assert [r["result"] for r in answer.get_json()["results"]] == ["archived", "already_archived"]
    assert list(store.list_keys("webhooks/")) == ["webhooks/2025/11/30/12/20/dupalert"]


def test_one_id_in_two_batches_minutes_apart_names_one_webhook_key():
    """A sender re-sends an alert with another created_at (a relay that re-stamps it) while
    its full record is still owed: the marker names the first push's key, so no second key."""
    app, store = _app_and_store()
    first = {"id": "resentalert", "created_at": 1764505224000}
    again = {"id": "resentalert", "created_at": 1764505224000 + 120_000}
    for alert, expected in (
        (first, "archived"),
        (again, "already_archived"),
        (first, "already_archived"),
    ):
        answer = app.post(f"/api/v1/s3/alert/{PUSH}", json={"alerts": [alert]})
        assert [r["result"] for r in answer.get_json()["results"]] == [expected]
    assert list(store.list_keys("webhooks/")) == ["webhooks/2025/11/30/12/20/resentalert"]
    assert list(store.list_keys("_poller/pending/")) == ["_poller/pending/resentalert"]


def test_a_marker_without_its_webhook_record_gets_it_from_the_re_send():
    """A push that died between its pending marker and its webhook record (the sender got a
    5xx): the re-send, in whatever minute, writes the record; nothing is left without one."""
    app, store = _app_and_store()
    store.put(
        "_poller/pending/halfpushed", b'{"webhook_key": "webhooks/2025/11/30/12/20/halfpushed"}'
    )
    resent = {"id": "halfpushed", "created_at": 1764505224000 + 120_000}
    answer = app.post(f"/api/v1/s3/alert/{PUSH}", json={"alerts": [resent]})
    assert [r["result"] for r in answer.get_json()["results"]] == ["archived"]
    assert list(store.list_keys("webhooks/")) == ["webhooks/2025/11/30/12/22/halfpushed"]
    marker = json.loads(store.get("_poller/pending/halfpushed").body)  # type: ignore[union-attr]
    assert marker["webhook_key"] == "webhooks/2025/11/30/12/22/halfpushed"
    assert "owed_since" in marker  # the rewrite does not restart the 404 grace period


@pytest.mark.parametrize(
    ("start", "end"),
    [("9999-12-31T00:00Z", "9999-12-31T23:00Z"), ("999999999d", "999999998d")],
)
def test_a_range_at_the_ends_of_time_is_an_answer_not_a_crash(start: str, end: str):
    app, _ = _app_and_store()
    answer = app.get(f"/api/v1/s3/alert?start={start}&end={end}", headers=bearer(READ))
    assert answer.status_code in (200, 400), answer.get_json()


def test_a_multi_member_gzip_body_is_decoded_whole_within_one_limit():
    """RFC 1952 allows members back to back (``cat a.gz b.gz``): all are decoded, and the
    size limit holds for their sum, not per member."""
    first, second = b'{"alerts": [{"id": "a"},', b' {"id": "b"}]}'
    body = gzip.compress(first) + gzip.compress(second)
    assert decode_body(body, "gzip", 1024) == first + second
    assert decode_body(body + b"\0" * 8, "gzip", 1024) == first + second  # padding
    two_halves = gzip.compress(b" " * 600) * 2  # each member under 1,000 bytes, both over
    with pytest.raises(PushRejected) as over:
        decode_body(two_halves, "gzip", 1000)
    assert over.value.status == 413
    with pytest.raises(PushRejected) as cut:
        decode_body(body[:-5], "gzip", 1024)  # the second member's trailer is missing
    assert cut.value.status == 400
    with pytest.raises(PushRejected) as junk:
        decode_body(gzip.compress(first) + b"not gzip", "gzip", 1024)
    assert junk.value.status == 400
