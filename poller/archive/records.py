"""What an alert becomes in the bucket: keys, the full record, the webhook record, quarantine.

Pure functions and values only; no I/O. The bucket layout is SPEC "The archive".
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from poller.timeutil import iso_z, parse_alert_time

SAFE_ID = re.compile(r"[A-Za-z0-9_-]{4,128}")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Layout:
    """Every key poller writes, under an optional prefix."""

    prefix: str = ""

    def key(self, *parts: str) -> str:
        return "/".join(([self.prefix] if self.prefix else []) + list(parts))

    def alert_key(self, alert_id: str) -> str:
        return self.key("alerts", alert_id[0:2], alert_id[2:4], alert_id)

    def dismissal_key(self, alert_id: str) -> str:
        """The alert as the dismissed list returned it, for an alert archived while active."""
        return self.key("dismissals", alert_id[0:2], alert_id[2:4], alert_id)

    @property
    def dismissal_index_prefix(self) -> str:
        return self.key("_poller", "index", "dismissals") + "/"

    def dismissal_index_key(self, alert_id: str, written: datetime) -> str:
        """The entry of a dismissal record in the time-keyed index (by the UTC hour it was
        written): the query tables find new dismissal records there without listing them all."""
        hour = written.astimezone(UTC).strftime("%Y/%m/%d/%H")
        return self.dismissal_index_prefix + hour + "/" + alert_id

    def webhook_key(self, alert_id: str, created: datetime) -> str:
        return self.key("webhooks", created.strftime("%Y/%m/%d/%H/%M"), alert_id)

    def quarantine_key(self, reason: str, digest: str) -> str:
        return self.key("_poller", "quarantine", reason, digest)

    @property
    def checkpoint_key(self) -> str:
        return self.key("_poller", "checkpoint.json")

    @property
    def revisit_key(self) -> str:
        return self.key("_poller", "revisit.json")

    @property
    def lease_key(self) -> str:
        return self.key("_poller", "lease.json")

    @property
    def backfill_prefix(self) -> str:
        return self.key("_poller", "backfill") + "/"

    def backfill_key(self, since: datetime, until: datetime, statuses: Iterable[str]) -> str:
        """One finished backfill chunk; the key itself says the span and the alert lists it
        covers (``20261101T000000Z_20261102T000000Z_active_dismissed``), so one listing
        tells what is done."""
        name = "_".join([_compact(since), _compact(until), *sorted(statuses)])
        return self.key("_poller", "backfill", name)

    @property
    def probe_key(self) -> str:
        return self.key("_poller", "probe")


def _compact(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def parse_compact(text: str) -> datetime:
    return datetime.strptime(text, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)


@dataclass(frozen=True)
class Alert:
    """An alert that can be archived: a safe id and a parseable creation time."""

    id: str
    created: datetime
    raw: dict[str, Any]


@dataclass(frozen=True)
class Rejected:
    """An object from the API that cannot be archived as it is."""

    reason: str
    detail: str
    raw: Any

    @property
    def digest(self) -> str:
        """Content address: the same bad object always lands on the same key.
        ``surrogatepass`` keeps a lone surrogate hashable without changing other digests."""
        canonical = json.dumps(self.raw, sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()

    @property
    def seen_key(self) -> str:
        return "q:" + self.digest


def classify(raw: Any) -> Alert | Rejected:
    """Decide whether an object from the API is archivable, and if not, why. Never raises:
    a bug met by one odd object quarantines that object instead of stopping the run."""
    try:
        return _classify(raw)
    except Exception as exc:  # noqa: BLE001 - one object's oddity must not stop the archive
        return Rejected("internal_error", f"{type(exc).__name__} while classifying", raw)


def _classify(raw: Any) -> Alert | Rejected:
    if not isinstance(raw, dict):
        return Rejected("not_an_object", f"expected a JSON object, got {type(raw).__name__}", raw)
    alert_id = raw.get("id")
    if alert_id is None or alert_id == "":
        return Rejected("missing_id", "the alert has no id", raw)
    if not isinstance(alert_id, str) or not SAFE_ID.fullmatch(alert_id):
        return Rejected(
            "unsafe_id",
            "the id is not 4 to 128 letters, digits, '-' or '_'",
            raw,
        )
    created_raw = raw.get("createdAt", raw.get("created_at"))
    try:
        created = parse_alert_time(created_raw)
    except (ValueError, OverflowError, OSError):
        return Rejected("bad_created_at", f"unparseable createdAt: {created_raw!r}"[:200], raw)
    if not 1970 < created.year < 10_000:
        return Rejected("bad_created_at", f"createdAt out of range: {created_raw!r}"[:200], raw)
    return Alert(alert_id, created, raw)


# What json_body raises for an object that has no faithful JSON form.
UNENCODABLE = (ValueError, TypeError, RecursionError)


def json_body(document: Any) -> bytes:
    """Strict JSON in UTF-8, JSON-equal to ``document``. Text UTF-8 cannot carry (a lone
    surrogate, which a ``\\ud83d`` escape in the API's JSON legally produces) is kept as
    its ``\\u`` escape instead. NaN and Infinity are not JSON: they raise ValueError."""
    text = json.dumps(document, ensure_ascii=False, allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(document, ensure_ascii=True, allow_nan=False).encode("ascii")


def as_integer(value: Any) -> int | None:
    """A number, or a numeric string as the vendor's payloads quote them; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    # ASCII digits only, and few enough to be a number anyone sends: "²" is a digit to
    # str.isdigit but not to int(), and int() refuses strings of over 4,300 digits.
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,19}", value.strip()):
        return int(value.strip())
    return None


def as_text(value: Any) -> str | None:
    """``""`` and null mean the same in v2 payloads (threatstack-api.md §7.11)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return str(value)


def webhook_source(raw: dict[str, Any]) -> str:
    """The webhook's ``source``: ``CloudTrail`` for CloudTrail alerts, ``Host`` for agent ones.

    Other data sources (Kubernetes, ThreatIntel, ...) keep their own name, title-cased as the
    rule types spell them, since the webhook documentation lists only the two values.
    """
    source = (as_text(raw.get("dataSource")) or as_text(raw.get("source")) or "").strip()
    lowered = source.lower()
    if lowered in ("cloudtrail", "aws", "aws_cloudtrail"):
        return "CloudTrail"
    if lowered in ("", "host", "agent", "file", "winsec"):
        return "Host"
    return source[:1].upper() + source[1:]


def webhook_server_or_region(raw: dict[str, Any], source: str) -> str | None:
    """The server name for host alerts, the region for CloudTrail, as far as the alert says."""
    candidates: tuple[str, ...]
    if source == "CloudTrail":
        candidates = ("region", "awsRegion", "serverOrRegion", "server_or_region")
    else:
        candidates = ("serverOrRegion", "server_or_region", "hostname", "serverName", "agentId")
    for name in candidates:
        value = as_text(raw.get(name))
        if value is not None:
            return value
    return None


def webhook_record(alert: Alert, organization_id: str) -> dict[str, Any]:
    """The alert in the format Threat Stack's webhook pushes (SPEC "The archive")."""
    source = webhook_source(alert.raw)
    return {
        "id": alert.id,
        "title": as_text(alert.raw.get("title")),
        "created_at": (alert.created - EPOCH) // timedelta(milliseconds=1),
        "severity": as_integer(alert.raw.get("severity")),
        "organization_id": organization_id,
        "server_or_region": webhook_server_or_region(alert.raw, source),
        "source": source,
    }


def quarantine_record(rejected: Rejected, status: str, seen_at: datetime) -> dict[str, Any]:
    return {
        "reason": rejected.reason,
        "detail": rejected.detail,
        "status": status,
        "seen_at": iso_z(seen_at),
        "raw": rejected.raw,
    }


def quarantine_body(rejected: Rejected, status: str, seen_at: datetime) -> bytes:
    """The quarantine record; an object with no JSON form is kept as its Python repr."""
    record = quarantine_record(rejected, status, seen_at)
    try:
        return json_body(record)
    except UNENCODABLE:
        record["raw"] = repr(rejected.raw)
        record["raw_is_repr"] = True
        return json_body(record)
