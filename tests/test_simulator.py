"""The simulator behaves like the API as far as threatstack-api.md knows it, and its faults
reach the client as the right error classes."""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, timedelta
from typing import Any

import mohawk
import pytest
import requests
from pydantic import SecretStr

from poller.config import ThreatStackSettings
from poller.errors import (
    ApiAuthError,
    ApiUnavailable,
    MalformedResponse,
    PollerError,
    RateLimited,
    RetriableError,
)
from poller.simulator import Faults, Simulator
from poller.threatstack.budget import RequestBudget
from poller.threatstack.client import ThreatStackClient
from poller.threatstack.retrying import RetryPolicy
from poller.timeutil import parse_alert_time, utc_now

pytestmark = pytest.mark.integration


def client_for(
    sim: Simulator,
    attempts: int = 1,
    timeout: float = 5.0,
    request_deadline_seconds: float = 120.0,
    **overrides: str,
) -> ThreatStackClient:
    creds = sim.credentials
    settings = ThreatStackSettings(
        base_url=sim.base_url,
        user_id=overrides.get("user_id", creds.user_id),
        org_id=overrides.get("org_id", creds.org_id),
        api_key=SecretStr(overrides.get("api_key", creds.api_key)),
        timeout_seconds=timeout,
        request_deadline_seconds=request_deadline_seconds,
    )
    return ThreatStackClient(
        settings,
        requests.Session(),
        RequestBudget(10_000),
        RetryPolicy(max_attempts=attempts, initial_backoff=0.01),
        lambda _: None,
    )


def hawk_header(sim: Simulator, url: str, timestamp: int | None = None) -> str:
    creds = sim.credentials
    return str(
        mohawk.Sender(
            {"id": creds.user_id, "key": creds.api_key, "algorithm": "sha256"},
            url,
            "GET",
            always_hash_content=False,
            ext=creds.org_id,
            _timestamp=timestamp,
        ).request_header
    )


def signed_get(sim: Simulator, path: str, timestamp: int | None = None) -> requests.Response:
    url = sim.base_url + path
    return requests.get(url, headers={"Authorization": hawk_header(sim, url, timestamp)}, timeout=5)


def test_pages_of_100_with_tokens_until_the_end(simulator: Simulator):
    now = utc_now()
    simulator.generate(250, now - timedelta(hours=5), now - timedelta(hours=1), 0.0)
    client = client_for(simulator)
    pages = list(client.list_alerts("active", now - timedelta(days=1), now))
    assert [len(p) for p in pages] == [100, 100, 50]
    ids = [a["id"] for p in pages for a in p]
    assert len(set(ids)) == 250
    for alert in pages[0]:
        created_hex = alert["id"][:8]
        assert abs(int(created_hex, 16) - int(utc_now().timestamp())) < 6 * 3600
        assert alert["severity"] in (1, 2, 3)


@pytest.mark.parametrize(
    ("from_inclusive", "until_inclusive", "expected"),
    [
        (True, False, {"at_from"}),
        (False, False, set()),
        (True, True, {"at_from", "at_until"}),
        (False, True, {"at_until"}),
    ],
)
def test_window_ends_are_switchable(
    from_inclusive: bool, until_inclusive: bool, expected: set[str]
):
    with Simulator(seed=3, from_inclusive=from_inclusive, until_inclusive=until_inclusive) as sim:
        t = utc_now().replace(microsecond=0) - timedelta(hours=1)
        names = {
            sim.add(sim.factory.alert(t), t).id: "at_from",
            sim.add(
                sim.factory.alert(t + timedelta(seconds=10)), t + timedelta(seconds=10)
            ).id: "at_until",
        }
        got = list(client_for(sim).list_alerts("active", t, t + timedelta(seconds=10)))
        assert {names[a["id"]] for p in got for a in p} == expected


def test_alerts_become_visible_late(simulator: Simulator):
    now = utc_now()
    simulator.add(
        simulator.factory.alert(now - timedelta(minutes=5)),
        now - timedelta(minutes=5),
        visible_at=now + timedelta(hours=1),
    )
    assert list(client_for(simulator).list_alerts("active", now - timedelta(hours=1), now)) == [[]]


@pytest.mark.parametrize(
    "override", [{"api_key": "wrong-key"}, {"org_id": "someone-elses-org"}, {"user_id": "nobody"}]
)
def test_hawk_rejects_wrong_credentials(simulator: Simulator, override: dict[str, str]):
    with pytest.raises(ApiAuthError):
        client_for(simulator, **override).self_test()


def test_hawk_rejects_stale_timestamps_and_replays(simulator: Simulator):
    stale = signed_get(simulator, "/help/hawk/self-test", timestamp=int(time.time()) - 600)
    assert stale.status_code == 401
    assert "ts=" in stale.headers["WWW-Authenticate"]
    url = simulator.base_url + "/help/hawk/self-test"
    header = hawk_header(simulator, url)
    assert requests.get(url, headers={"Authorization": header}, timeout=5).status_code == 200
    assert requests.get(url, headers={"Authorization": header}, timeout=5).status_code == 401


def test_status_is_required_and_detail_routes_exist(simulator: Simulator):
    assert signed_get(simulator, "/v2/alerts").status_code == 400
    now = utc_now()
    alert = simulator.generate(1, now - timedelta(hours=2), now - timedelta(hours=1))[0]
    assert signed_get(simulator, f"/v2/alerts/{alert.id}").json()["id"] == alert.id
    assert len(signed_get(simulator, f"/v2/alerts/{alert.id}/events").json()["events"]) == 2
    agent = simulator.factory.agents[0]
    assert signed_get(simulator, f"/v2/agents/{agent}").json()["id"] == agent
    assert simulator.request_count("/v2/") == 4


def test_org_wide_limit_answers_429_with_headers_and_no_json():
    with Simulator(faults=Faults(org_limit_per_minute=5)) as sim:
        codes = [signed_get(sim, "/help/hawk/self-test") for _ in range(6)]
    assert [r.status_code for r in codes] == [200] * 5 + [429]
    limited = codes[-1]
    assert limited.headers["x-rate-limit-remaining"] == "0"
    assert 0 < int(limited.headers["x-rate-limit-reset"]) <= 60_000
    with pytest.raises(ValueError):
        limited.json()


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("429", RateLimited),
        ("500", ApiUnavailable),
        ("502", ApiUnavailable),
        ("503", ApiUnavailable),
        ("slow", ApiUnavailable),
        ("drop", ApiUnavailable),
        ("truncate", PollerError),  # cut short: a transport error or a failed signature
        ("bad_json", MalformedResponse),
    ],
)
def test_each_fault_reaches_the_client_as_a_retriable_error(kind: str, error: type):
    with (
        Simulator(faults=Faults(rate={kind: 1.0}, slow_seconds=1.0)) as sim,
        pytest.raises(error) as caught,
    ):
        client_for(sim, timeout=0.5).self_test()
    assert isinstance(caught.value, RetriableError)


def test_faults_can_be_switched_while_running(simulator: Simulator):
    client = client_for(simulator)
    simulator.faults.rate = {"503": 1.0}
    with pytest.raises(ApiUnavailable):
        client.self_test()
    simulator.faults.rate = {}
    assert client.self_test() == {"authenticated": True}


def test_a_body_that_trickles_in_is_cut_off_at_the_request_deadline(simulator: Simulator):
    """Every read brings a few bytes within the socket timeout, so only the total bound
    stops it: the request fails after about request_deadline_seconds, not after the body."""
    now = utc_now()
    simulator.generate(50, now - timedelta(hours=2), now - timedelta(hours=1))
    simulator.faults.trickle_seconds = 8.0
    client = client_for(simulator, timeout=2.0, request_deadline_seconds=1.0)
    with pytest.raises(ApiUnavailable, match=r"did not finish within 1s") as caught:
        list(client.list_alerts("active", now - timedelta(days=1), now))
    simulator.faults.trickle_seconds = 0.0
    received = int(re.search(r"\((\d+) bytes so far\)", str(caught.value)).group(1))  # type: ignore[union-attr]
    whole = len(signed_get(simulator, "/v2/alerts?status=active").content)
    assert received < whole / 2  # it gave up long before the body was complete


def signed_post(sim: Simulator, path: str, document: Any) -> requests.Response:
    """A Hawk-signed POST whose JSON body is hashed into the MAC, as the vendor's examples do."""
    creds = sim.credentials
    url, body = sim.base_url + path, json.dumps(document)
    sender = mohawk.Sender(
        {"id": creds.user_id, "key": creds.api_key, "algorithm": "sha256"},
        url,
        "POST",
        content=body,
        content_type="application/json",
        ext=creds.org_id,
    )
    headers = {"Authorization": sender.request_header, "Content-Type": "application/json"}
    return requests.post(url, data=body, headers=headers, timeout=5)


def listed_ids(sim: Simulator, status: str, since: datetime, until: datetime) -> set[str]:
    query = f"status={status}&from={since:%Y-%m-%dT%H:%M:%S}&until={until:%Y-%m-%dT%H:%M:%S}"
    return {a["id"] for a in signed_get(sim, f"/v2/alerts?{query}").json()["alerts"]}


def test_dismiss_by_ids_moves_alerts_to_the_dismissed_list_keeping_id_and_creation(
    simulator: Simulator,
):
    now = utc_now()
    start, end = now - timedelta(hours=3), now - timedelta(hours=1)
    alerts = simulator.generate(5, start, end, dismissed_fraction=0)
    before = {a.id: dict(a.doc) for a in alerts}
    chosen = [alerts[0].id, alerts[3].id]

    answer = signed_post(
        simulator,
        "/v2/alerts/dismiss",
        {"ids": chosen, "dismissReason": "OTHER", "dismissReasonText": "handled in ticket 42"},
    )
    assert answer.status_code == 200, answer.text
    assert sorted(answer.json()["dismissed"]) == sorted(chosen)
    assert listed_ids(simulator, "dismissed", start, now) == set(chosen)
    assert listed_ids(simulator, "active", start, now) == set(before) - set(chosen)
    for alert_id in chosen:
        doc = signed_get(simulator, f"/v2/alerts/{alert_id}").json()
        assert doc["isDismissed"] is True
        assert doc["dismissReason"] == "OTHER"
        assert doc["dismissReasonText"] == "handled in ticket 42"
        assert doc["dismissedBy"] == "analyst@example.com"
        assert parse_alert_time(doc["dismissedAt"]) >= parse_alert_time(doc["createdAt"])
        changed = {"isDismissed", "dismissedAt", "dismissReason", "dismissReasonText"}
        unchanged = {k: v for k, v in doc.items() if k not in changed | {"dismissedBy"}}
        assert unchanged == {k: v for k, v in before[alert_id].items() if k in unchanged}
        assert doc["id"] == alert_id and doc["createdAt"] == before[alert_id]["createdAt"]


def test_dismiss_by_query_needs_a_range_and_a_filter(simulator: Simulator):
    now = utc_now()
    start, end = now - timedelta(hours=3), now - timedelta(hours=1)
    alerts = simulator.generate(12, start, end, dismissed_fraction=0)
    severity = alerts[0].doc["severity"]
    window = {"from": f"{start:%Y-%m-%dT%H:%M:%S}", "until": f"{now:%Y-%m-%dT%H:%M:%S}"}

    answer = signed_post(
        simulator,
        "/v2/alerts/dismiss",
        {**window, "severity": severity, "dismissReason": "MAINTENANCE"},
    )
    assert answer.status_code == 200, answer.text
    expected = {a.id for a in alerts if a.doc["severity"] == severity}
    assert set(answer.json()["dismissed"]) == expected
    assert listed_ids(simulator, "dismissed", start, now) == expected
    assert all(a.doc["dismissReasonText"] is None for a in alerts if a.id in expected)

    for bad in (
        {**window, "dismissReason": "MAINTENANCE"},  # no filter
        {"severity": 1, "dismissReason": "MAINTENANCE"},  # no range
        {"ids": [alerts[1].id], "dismissReason": "BORED"},  # unknown reason
        {"ids": [alerts[1].id], "dismissReason": "MAINTENANCE", "dismissReasonText": "x"},
    ):
        refused = signed_post(simulator, "/v2/alerts/dismiss", bad)
        assert refused.status_code == 400, bad
        assert refused.json()["errors"]
    assert simulator.alerts[1].status == "active"


def test_dismiss_is_hawk_signed_over_its_body(simulator: Simulator):
    """A body that is not the one signed is refused: the payload hash is in the MAC."""
    creds = simulator.credentials
    url = simulator.base_url + "/v2/alerts/dismiss"
    sender = mohawk.Sender(
        {"id": creds.user_id, "key": creds.api_key, "algorithm": "sha256"},
        url,
        "POST",
        content='{"ids": []}',
        content_type="application/json",
        ext=creds.org_id,
    )
    answer = requests.post(
        url,
        data='{"ids": ["x"]}',
        headers={"Authorization": sender.request_header, "Content-Type": "application/json"},
        timeout=5,
    )
    assert answer.status_code == 401
