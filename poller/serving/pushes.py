"""What a webhook push is: the payload shapes and envelopes seen in the wild, read into
alerts to archive or objects to quarantine.

Threat Stack's webhook (and the old receiver's README) send ``{"alerts": [...]}``; the
vendor's help pages show one alert object per call, with ``created_at`` and ``severity`` as
quoted numbers (threatstack-api.md §5.1). Both shapes are accepted, numbers or numeric
strings alike. ``created_at`` is read as the poll path reads ``createdAt``
(``records.classify``): milliseconds, seconds (a number below 1e11 is seconds: 1e11 ms is
1973, 1e11 s is year 5138), or ISO 8601. A UTF-8 byte order mark is skipped; a gzip body is
decoded up to the size limit; an AWS SNS envelope (``x-amz-sns-message-type``) is unwrapped
(a ``Notification``'s ``Message`` is the push) or, for a subscription confirmation, handed
back to the caller. Pure functions: no I/O.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from poller.archive.records import Alert, Rejected, as_integer, as_text, classify

MAX_ALERTS_PER_PUSH = 1000
JSON_TYPES = ("application/json", "text/json", "")
SNS_TYPE_HEADER = "x-amz-sns-message-type"


class PushRejected(ValueError):
    """The request as a whole is refused (a 4xx): nothing of it is written."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class PushedAlert:
    """One alert of a push, as the webhook describes it."""

    id: str
    created: datetime
    raw: dict[str, Any]


@dataclass(frozen=True)
class SnsConfirmation:
    """An SNS ``SubscriptionConfirmation``: whether to confirm is the caller's decision."""

    topic_arn: str
    subscribe_url: str


def read_alert(raw: Any, organization_id: str) -> PushedAlert | Rejected:
    """One alert, or why it cannot be archived as it is (the poll path's reasons, plus
    ``bad_severity`` and ``other_organization``). Never raises."""
    item = classify(raw)
    if isinstance(item, Rejected):
        return item
    severity = item.raw.get("severity")
    if severity is not None and severity != "" and as_integer(severity) is None:
        return Rejected("bad_severity", f"severity is not a number: {severity!r}"[:200], raw)
    org = as_text(item.raw.get("organization_id"))
    if org and organization_id and org != organization_id:
        # Another organisation's webhook pointed here: its full record can never be fetched
        # with our credentials, so it is kept aside, never owed.
        return Rejected("other_organization", f"organization_id {org!r}"[:200], raw)
    return _pushed(item)


def _pushed(alert: Alert) -> PushedAlert:
    return PushedAlert(alert.id, alert.created, alert.raw)


def decode_body(body: bytes, content_encoding: str, limit: int) -> bytes:
    """The body as sent, decoded: identity or gzip (at most ``limit`` bytes once decoded).

    A gzip body may hold several members, one after another (RFC 1952, 2.2: concatenated
    files, as ``cat a.gz b.gz`` or a streaming writer produces): they are decoded in turn,
    within the one ``limit`` for all of them. Zero bytes after the last member (a padding
    some writers leave) are ignored, as the gzip tool ignores them. 400 for invalid or
    truncated gzip, 413 past the limit, 415 for another encoding."""
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "x-gzip"):
        raise PushRejected(415, f"Content-Encoding {encoding!r} is not supported (gzip is)")
    decoded = bytearray()
    rest = body
    while True:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            # never 0 (zlib's "no limit"): the loop ends once decoded passes the limit
            decoded += inflater.decompress(rest, limit + 1 - len(decoded))
        except zlib.error:
            raise PushRejected(400, "the body is not valid gzip") from None
        if len(decoded) > limit or inflater.unconsumed_tail:
            raise PushRejected(413, f"the body is over {limit} bytes once decompressed")
        if not inflater.eof:
            raise PushRejected(400, "the body is not valid gzip (it ends inside a member)")
        rest = inflater.unused_data
        if not rest.strip(b"\0"):
            return bytes(decoded)


def _integer(digits: str) -> int | str:
    """A JSON integer; one too long for ``int()`` (over 4,300 digits) is kept as its digits,
    so only the field that holds it is judged (its alert quarantined), never the batch."""
    try:
        return int(digits)
    except ValueError:
        return digits


def read_document(body: bytes) -> Any:
    try:
        # utf-8-sig: a byte order mark before the JSON is skipped
        return json.loads(body.decode("utf-8-sig"), parse_int=_integer)
    except (ValueError, RecursionError):
        raise PushRejected(400, "the body is not JSON") from None


def unwrap(body: bytes, content_type: str, sns_type: str) -> tuple[Any, SnsConfirmation | None]:
    """The push document of a request, and the SNS confirmation when that is what it is.

    SNS posts ``text/plain``; anything else must be JSON."""
    media = content_type.split(";")[0].strip().lower()
    if sns_type:
        envelope = read_document(body)
        if not isinstance(envelope, dict):
            raise PushRejected(400, "an SNS message must be a JSON object")
        kind = sns_type.strip()
        if kind == "SubscriptionConfirmation":
            topic, url = envelope.get("TopicArn"), envelope.get("SubscribeURL")
            if not isinstance(topic, str) or not isinstance(url, str):
                raise PushRejected(400, "an SNS confirmation needs TopicArn and SubscribeURL")
            return None, SnsConfirmation(topic, url)
        if kind == "Notification":
            message = envelope.get("Message")
            if not isinstance(message, str):
                raise PushRejected(400, "an SNS notification's Message must be a string")
            return read_document(message.encode("utf-8")), None
        if kind == "UnsubscribeConfirmation":
            return None, None
        raise PushRejected(400, f"unknown SNS message type {kind[:40]!r}")
    if media not in JSON_TYPES:
        raise PushRejected(415, "the body must be JSON (Content-Type: application/json)")
    return read_document(body), None


def alerts_of(document: Any) -> list[Any]:
    """The raw alerts of a push document; PushRejected when its shape is wrong."""
    if isinstance(document, dict) and "alerts" in document:
        alerts = document["alerts"]
        if not isinstance(alerts, list):
            raise PushRejected(400, "'alerts' must be a list")
    elif isinstance(document, dict) and "id" in document:
        alerts = [document]
    else:
        raise PushRejected(400, 'expected {"alerts": [...]} or one alert object')
    if not alerts:
        raise PushRejected(400, "no alerts in the push")
    if len(alerts) > MAX_ALERTS_PER_PUSH:
        raise PushRejected(413, f"more than {MAX_ALERTS_PER_PUSH} alerts in one push")
    return alerts


def read_push(document: Any, organization_id: str) -> list[PushedAlert | Rejected]:
    """Each alert of a push, read or rejected (to be quarantined)."""
    return [read_alert(raw, organization_id) for raw in alerts_of(document)]
