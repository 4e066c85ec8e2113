"""Key derivation, classification and the webhook mapping (SPEC "The archive")."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from poller.archive.records import Alert, Layout, Rejected, classify, json_body, webhook_record

ID = "587c0159a907346eccb84004"  # threatstack-to-s3 README: created 2017-01-15 23:10:17Z


def alert(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "id": ID,
        "title": "Netcat Detected!",
        "createdAt": "2017-01-15T23:10:17.237Z",
        "severity": 1,
        "dataSource": "host",
        "agentId": "d1230d0f-392b-1ee9-b92a-5b6ae75feb22",
    }
    base.update(fields)
    return base


@pytest.mark.parametrize(
    ("prefix", "expected_alert", "expected_webhook"),
    [
        ("", f"alerts/58/7c/{ID}", f"webhooks/2017/01/15/23/10/{ID}"),
        ("team/ts", f"team/ts/alerts/58/7c/{ID}", f"team/ts/webhooks/2017/01/15/23/10/{ID}"),
    ],
)
def test_keys_match_the_old_receiver(prefix: str, expected_alert: str, expected_webhook: str):
    item = classify(alert())
    assert isinstance(item, Alert)
    layout = Layout(prefix)
    assert layout.alert_key(item.id) == expected_alert
    assert layout.webhook_key(item.id, item.created) == expected_webhook
    assert layout.checkpoint_key == (f"{prefix}/" if prefix else "") + "_poller/checkpoint.json"


def test_webhook_minute_path_is_zero_padded_utc():
    item = classify(alert(createdAt="2026-03-04T05:06:59.999+02:00"))
    assert isinstance(item, Alert)
    assert Layout().webhook_key(item.id, item.created) == f"webhooks/2026/03/04/03/06/{ID}"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (["not", "an", "object"], "not_an_object"),
        (alert(id=None), "missing_id"),
        (alert(id=""), "missing_id"),
        ({k: v for k, v in alert().items() if k != "id"}, "missing_id"),
        (alert(id="abc"), "unsafe_id"),  # too short
        (alert(id="x" * 129), "unsafe_id"),
        (alert(id="58/7c0159"), "unsafe_id"),
        (alert(id="../587c0159"), "unsafe_id"),
        (alert(id="587c 0159"), "unsafe_id"),
        (alert(id=12345678), "unsafe_id"),
        (alert(createdAt="yesterday-ish"), "bad_created_at"),
        (alert(createdAt=""), "bad_created_at"),
        (alert(createdAt=None), "bad_created_at"),
        (alert(createdAt=True), "bad_created_at"),
        (alert(createdAt=10**30), "bad_created_at"),
    ],
)
def test_unarchivable_objects_are_rejected_with_a_reason(raw: object, reason: str):
    item = classify(raw)
    assert isinstance(item, Rejected)
    assert item.reason == reason
    assert item.raw == raw


def test_rejected_digest_is_stable_and_content_addressed():
    one, two = classify(alert(id="a/b/c/d")), classify(alert(id="a/b/c/d"))
    other = classify(alert(id="a/b/c/e"))
    assert isinstance(one, Rejected) and isinstance(two, Rejected) and isinstance(other, Rejected)
    assert one.digest == two.digest != other.digest
    assert len(one.digest) == 64


@pytest.mark.parametrize(
    ("created", "millis"),
    [
        ("2016-03-31T17:57:04.000Z", 1459447024000),
        ("2016-03-31T17:57:04.237Z", 1459447024237),
        ("2016-03-31T17:57:04", 1459447024000),
        (1459447024237, 1459447024237),  # epoch ms, as v1 and the webhook use
        ("1459447024000", 1459447024000),
        (1459447024, 1459447024000),  # epoch seconds
    ],
)
def test_webhook_created_at_is_integer_milliseconds(created: object, millis: int):
    item = classify(alert(createdAt=created))
    assert isinstance(item, Alert)
    record = webhook_record(item, "org-1")
    assert record["created_at"] == millis
    assert isinstance(record["created_at"], int)


def test_webhook_record_has_exactly_the_webhook_fields():
    item = classify(alert())
    assert isinstance(item, Alert)
    assert webhook_record(item, "545d0293b620cd090d000023") == {
        "id": ID,
        "title": "Netcat Detected!",
        "created_at": 1484521817237,
        "severity": 1,
        "organization_id": "545d0293b620cd090d000023",
        "server_or_region": "d1230d0f-392b-1ee9-b92a-5b6ae75feb22",
        "source": "Host",
    }


@pytest.mark.parametrize(
    ("fields", "source", "server_or_region", "severity"),
    [
        (
            {"dataSource": "cloudtrail", "region": "us-east-1", "agentId": None},
            "CloudTrail",
            "us-east-1",
            1,
        ),
        ({"dataSource": "CloudTrail", "awsRegion": "eu-west-1"}, "CloudTrail", "eu-west-1", 1),
        ({"dataSource": "host", "hostname": "web-1"}, "Host", "web-1", 1),
        ({"dataSource": "", "agentId": ""}, "Host", None, 1),
        ({"dataSource": None}, "Host", "d1230d0f-392b-1ee9-b92a-5b6ae75feb22", 1),
        (
            {"dataSource": "kubernetesAudit"},
            "KubernetesAudit",
            "d1230d0f-392b-1ee9-b92a-5b6ae75feb22",
            1,
        ),
        ({"severity": "2"}, "Host", "d1230d0f-392b-1ee9-b92a-5b6ae75feb22", 2),
        ({"severity": 3.0}, "Host", "d1230d0f-392b-1ee9-b92a-5b6ae75feb22", 3),
        ({"severity": "high"}, "Host", "d1230d0f-392b-1ee9-b92a-5b6ae75feb22", None),
        ({"severity": True}, "Host", "d1230d0f-392b-1ee9-b92a-5b6ae75feb22", None),
    ],
)
def test_webhook_mapping_normalises_tolerable_oddities(
    fields: dict[str, object], source: str, server_or_region: str | None, severity: int | None
):
    raw = alert(**fields)
    item = classify(raw)
    assert isinstance(item, Alert)
    record = webhook_record(item, "org")
    assert (record["source"], record["server_or_region"], record["severity"]) == (
        source,
        server_or_region,
        severity,
    )
    assert item.raw == raw  # the full record keeps the oddities as they came


def test_empty_title_becomes_null_in_the_webhook_record():
    item = classify(alert(title=""))
    assert isinstance(item, Alert)
    assert webhook_record(item, "org")["title"] is None


def test_created_time_is_utc_aware():
    item = classify(alert())
    assert isinstance(item, Alert)
    assert item.created == datetime(2017, 1, 15, 23, 10, 17, 237000, tzinfo=UTC)


@pytest.mark.parametrize(
    "text",
    [
        "plain",
        "\ud83d",
        "\ude00x",
        "🚀\U0001d518",
        "a\x00b\x1b[0m",
        "\u202egnp.exe",
        "\ufeff\u200b",
        "",
    ],
)
def test_json_body_is_json_equal_for_any_text(text: str):
    document = {"id": "abcd", "title": text, "nested": [{"v": text}]}
    body = json_body(document)
    assert json.loads(body) == document
    body.decode("utf-8")  # always valid UTF-8, lone surrogates kept as \u escapes


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_json_body_refuses_what_json_cannot_hold(value: float):
    with pytest.raises(ValueError):
        json_body({"severity": value})


def test_classify_never_raises():
    class Hostile(dict):  # type: ignore[type-arg]
        def get(self, *_: Any) -> Any:
            raise RuntimeError("boom")

    assert classify(Hostile()).reason == "internal_error"  # type: ignore[union-attr]


def test_the_quarantine_index_finds_an_alert_by_its_raw_object_whatever_the_reason():
    """An alert ``take`` quarantines is found again from the object the API lists, with the
    reason and detail it was kept with; another object is not."""
    from poller.archive.quarantines import QuarantineIndex
    from poller.archive.store import MemoryObjectStore
    from poller.archive.writer import Archive, Outcome

    moment = datetime(2026, 11, 25, tzinfo=UTC)
    store = MemoryObjectStore(lambda: moment)
    layout = Layout("p")
    archive = Archive(store, layout, "org")
    raw = {"id": "abcd1234", "createdAt": "2026-11-25T00:00:00Z", "severity": float("nan")}
    alert = classify(raw)
    assert isinstance(alert, Alert)
    assert archive.take(alert, "dismissed", moment) is Outcome.QUARANTINED
    assert archive.quarantine_key_of(alert).startswith("p/_poller/quarantine/unencodable/")
    fine = classify({"id": "efgh5678", "createdAt": "2026-11-25T00:00:00Z"})
    assert isinstance(fine, Alert)
    assert archive.quarantine_key_of(fine).startswith("p/_poller/quarantine/internal_error/")

    index = QuarantineIndex(store, layout)
    found = index.find(dict(raw))
    assert found is not None and found.key == archive.quarantine_key_of(alert)
    assert (found.reason, found.status, found.seen_at) == (
        "unencodable",
        "dismissed",
        "2026-11-25T00:00:00Z",
    )
    assert found.detail.startswith("no faithful JSON form (ValueError")
    assert index.find(fine.raw) is None
    assert index.find({**raw, "title": "changed"}) is None  # another object, another digest
