"""What a webhook push is: the payload shapes seen in the wild, read into alerts or reasons.

Threat Stack's webhook (and the old receiver's README) send ``{"alerts": [...]}``; the
vendor's help pages show one alert object per call, with ``created_at`` and ``severity`` as
quoted numbers (threatstack-api.md §5.1). Both shapes are accepted, numbers or numeric
strings alike, ``organization_name`` optional. Pure functions: no I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from poller.archive.records import SAFE_ID, as_integer

MAX_ALERTS_PER_PUSH = 1000


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
class Refused:
    """One alert of a push that cannot be taken; the rest of the batch still is."""

    id: str | None
    reason: str


def read_alert(raw: Any) -> PushedAlert | Refused:
    if not isinstance(raw, dict):
        return Refused(None, "an alert must be a JSON object")
    alert_id = raw.get("id")
    if not isinstance(alert_id, str) or not SAFE_ID.fullmatch(alert_id):
        shown = alert_id if isinstance(alert_id, str) and len(alert_id) <= 128 else None
        return Refused(shown, "the id is not 4 to 128 letters, digits, '-' or '_'")
    millis = as_integer(raw.get("created_at"))
    if millis is None or not 0 < millis < 253_402_300_800_000:  # before year 10000
        return Refused(alert_id, "created_at is not milliseconds since the epoch")
    if raw.get("severity") is not None and as_integer(raw.get("severity")) is None:
        return Refused(alert_id, "severity is not a number")
    return PushedAlert(alert_id, datetime.fromtimestamp(millis / 1000, UTC), raw)


def read_push(body: bytes, content_type: str) -> list[PushedAlert | Refused]:
    """The alerts of a push, each read or refused; PushRejected when the whole is wrong."""
    if content_type.split(";")[0].strip().lower() not in ("application/json", ""):
        raise PushRejected(415, "the body must be JSON (Content-Type: application/json)")
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise PushRejected(400, "the body is not JSON") from None
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
    return [read_alert(raw) for raw in alerts]
