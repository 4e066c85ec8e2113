"""``poller verify``: is the archive complete for a range? And with ``--repair``, make it so.

Day by day (UTC), it lists the alert ids the API has (both statuses) and what the archive
holds, by listing keys, never downloading a body:

- ``webhooks/`` is partitioned by time: one listing of ``webhooks/YYYY/MM/DD/`` per day;
- ``alerts/`` is not, but its ``ID[0:2]/ID[2:4]/`` folders are, for Threat Stack's ids: an
  alert id is a MongoDB ObjectId whose first 8 hex digits are its creation second, so one
  folder holds 65,536 seconds (about 18 hours) of alerts. Verify lists the folders a day's
  API ids fall in and the folders the day's seconds map to (one or two a day), each once,
  caching the few it still needs. Cost: a LIST per 1,000 keys of each, plus the API's pages.

An id in the archive is "unknown" when the API does not list it for its day: for ObjectIds
its creation second says which day it belongs to; any other id is judged only by its webhook
key, whose path holds its creation minute. Keys in the first and last minute of a range that
does not start or end on a minute are not judged (the minute may hold alerts outside it).

Dismissals (SPEC "Dismissals"): for each alert the API lists as dismissed whose full record
is archived, the ``dismissals/ID[0:2]/ID[2:4]/`` folders are listed like the ``alerts/``
ones; an alert with no dismissal record costs one GET of its full record, and is reported
when that record is the active version (the archive then shows the alert as never handled).

An alert whose records are absent but which the sync quarantined (no faithful JSON form, a
bug met while archiving it: ``P/_poller/quarantine/REASON/SHA256`` of its raw object) is not
missing: the SPEC's guarantee is "archived (or quarantined)". It is reported as quarantined,
with the reason and detail its record holds, and does not fail the run.

``--repair`` archives exactly what is missing, dismissal records included, through the same
create-only writes as every run: a record that is there is never rewritten. An alert it can
only quarantine is quarantined, reported as such, and counts as repaired; the next
``--repair`` finds it there and writes nothing. ``--checksums``
also reads every archived record of the range (one GET each) and compares its body's
SHA-256 with the checksum S3 stored when it was written: a mismatch means the object is not
what poller wrote.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from poller.archive.manifests import MANIFEST_VERSION, Manifests, sha256_hex
from poller.archive.quarantines import Quarantined, QuarantineIndex
from poller.archive.records import Alert, Layout, Rejected, classify
from poller.archive.store import ObjectStore
from poller.archive.writer import Archive, Outcome
from poller.timeutil import Clock, iso_z
from poller.walks.sync import (
    OVERLAP,
    AlertSource,
    CycleObserver,
    Summary,
    Unobserved,
    chunks,
    poll_order,
)

log = logging.getLogger(__name__)

DAY = timedelta(days=1)
# Ids listed per kind in the report (text and JSON); counts are always exact.
IDS_SHOWN = 100
OBJECT_ID = re.compile(r"[0-9a-f]{24}")
KINDS = ("alerts", "webhooks")


@dataclass
class DayRow:
    day: str
    api: int = 0
    archived: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    missing: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    unknown: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    dismissed: int = 0  # alerts the API lists as dismissed
    dismissals_missing: int = 0  # of those, archived active with no dismissal record
    quarantined: int = 0  # alerts kept in the quarantine, not archived (not missing either)


@dataclass
class Findings:
    """Missing and unknown ids per record kind: exact counts, the first IDS_SHOWN ids."""

    missing: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    unknown: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    missing_count: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    unknown_count: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    checksums_checked: int = 0
    checksum_mismatch: list[str] = field(default_factory=list)  # keys whose body changed
    checksum_absent: int = 0  # records written without a checksum (before 0.1.0, or off)
    manifest_checked: int = 0  # records compared with their day's manifest
    manifest_mismatch: list[str] = field(default_factory=list)  # keys changed since closing
    manifest_chain_broken: list[str] = field(default_factory=list)  # days whose manifest changed
    not_in_manifest: int = 0  # records added to a day after its manifest was written
    to_repair: int = 0  # alerts with at least one record missing
    repaired: int = 0
    dismissals_missing: list[str] = field(default_factory=list)  # the first IDS_SHOWN
    dismissals_missing_count: int = 0
    dismissals_repaired: int = 0
    dismissals_quarantined_now: int = 0  # dismissed versions with no JSON form, quarantined
    repair_asked: bool = False
    malformed: int = 0
    # Of the malformed objects, those the quarantine does not hold (the sync never met them:
    # listed late, after its window moved on): missing, as an alert would be; --repair
    # quarantines them.
    malformed_not_quarantined: int = 0
    malformed_quarantined_now: int = 0
    # Alerts the API lists that the quarantine holds instead of the archive: the first
    # IDS_SHOWN as {"id", "key", "reason", "detail", "status", "seen_at"}; the count is exact.
    quarantined: list[dict[str, str]] = field(default_factory=list)
    quarantined_count: int = 0
    quarantined_now: int = 0  # of the missing, quarantined by this --repair
    days: list[DayRow] = field(default_factory=list)

    def note(self, table: str, kind: str, ids: list[str]) -> None:
        counts = self.missing_count if table == "missing" else self.unknown_count
        shown = self.missing if table == "missing" else self.unknown
        counts[kind] += len(ids)
        room = IDS_SHOWN - len(shown[kind])
        shown[kind].extend(sorted(ids)[: max(room, 0)])

    def note_quarantined(self, alert_id: str, record: Quarantined) -> None:
        self.quarantined_count += 1
        if len(self.quarantined) < IDS_SHOWN:
            self.quarantined.append(record.report(alert_id))

    @property
    def complete(self) -> bool:
        """Nothing is missing (or everything missing was repaired, or quarantined: SPEC
        "archived (or quarantined)"), nothing was altered."""
        handled = self.repaired + self.quarantined_now
        restored = self.to_repair == 0 or (self.repair_asked and handled == self.to_repair)
        dismissals_handled = self.dismissals_repaired + self.dismissals_quarantined_now
        dismissals = self.dismissals_missing_count == 0 or (
            self.repair_asked and dismissals_handled == self.dismissals_missing_count
        )
        altered = self.checksum_mismatch or self.manifest_mismatch or self.manifest_chain_broken
        malformed = self.malformed_not_quarantined == 0 or (
            self.repair_asked and self.malformed_quarantined_now == self.malformed_not_quarantined
        )
        return restored and dismissals and malformed and not altered

    def as_dict(self) -> dict[str, Any]:
        return {
            "complete": self.complete,
            "missing": self.missing,
            "missing_count": self.missing_count,
            "unknown": self.unknown,
            "unknown_count": self.unknown_count,
            "ids_shown_per_kind": IDS_SHOWN,
            "repaired": self.repaired,
            "dismissals_missing": self.dismissals_missing,
            "dismissals_missing_count": self.dismissals_missing_count,
            "dismissals_repaired": self.dismissals_repaired,
            "dismissals_quarantined_now": self.dismissals_quarantined_now,
            "checksums_checked": self.checksums_checked,
            "checksum_mismatch": self.checksum_mismatch[:IDS_SHOWN],
            "checksum_mismatch_count": len(self.checksum_mismatch),
            "checksum_absent": self.checksum_absent,
            "manifest_checked": self.manifest_checked,
            "manifest_mismatch": self.manifest_mismatch[:IDS_SHOWN],
            "manifest_mismatch_count": len(self.manifest_mismatch),
            "manifest_chain_broken": self.manifest_chain_broken,
            "not_in_manifest": self.not_in_manifest,
            "malformed_in_api": self.malformed,
            "malformed_not_quarantined": self.malformed_not_quarantined,
            "malformed_quarantined_now": self.malformed_quarantined_now,
            "quarantined_alerts": self.quarantined,
            "quarantined_count": self.quarantined_count,
            "quarantined_now": self.quarantined_now,
            "days": [row.__dict__ for row in self.days],
        }


class PrefixListings:
    """Keys under ``alerts/XX/YY/`` (or ``dismissals/XX/YY/``) folders, each listed once,
    the most recent few kept."""

    def __init__(
        self, store: ObjectStore, layout: Layout, keep: int = 8, kind: str = "alerts"
    ) -> None:
        self._store = store
        self._layout = layout
        self._keep = keep
        self._kind = kind
        self._cache: OrderedDict[str, set[str]] = OrderedDict()

    def ids(self, folder: str) -> set[str]:
        if folder in self._cache:
            self._cache.move_to_end(folder)
            return self._cache[folder]
        prefix = self._layout.key(self._kind, folder[:2], folder[2:4]) + "/"
        found = {key.rsplit("/", 1)[1] for key in self._store.list_keys(prefix)}
        self._cache[folder] = found
        if len(self._cache) > self._keep:
            self._cache.popitem(last=False)
        return found


def _object_id_time(alert_id: str) -> datetime | None:
    if OBJECT_ID.fullmatch(alert_id):
        return datetime.fromtimestamp(int(alert_id[:8], 16), UTC)
    return None


def _folders_for(start: datetime, end: datetime) -> set[str]:
    """The ``alerts/`` folders ObjectIds created in [start, end) live in."""
    first, last = int(start.timestamp()) >> 16, (int(end.timestamp()) - 1) >> 16
    return {f"{value << 16:08x}"[:4] for value in range(first, last + 1)}


class Verifier:
    def __init__(
        self,
        source: AlertSource,
        store: ObjectStore,
        archive: Archive,
        statuses: tuple[str, ...],
        clock: Clock,
        observer: CycleObserver | None = None,
    ) -> None:
        self.source = source
        self.store = store
        self.archive = archive
        self.layout = archive.layout
        self.statuses = poll_order(statuses)
        # The dismissed list is read even when threatstack.statuses leaves it out, as the
        # revisit reads it: only to find later dismissals of alerts archived active, never to
        # call a dismissed alert missing (README: An audit).
        self._lists = poll_order(tuple(dict.fromkeys((*statuses, "dismissed"))))
        self.clock = clock
        self.observer: CycleObserver = observer or Unobserved()
        self._dismissal_folders = PrefixListings(store, self.layout, kind="dismissals")
        self._quarantine = QuarantineIndex(store, self.layout)
        self._malformed_seen: set[str] = set()
        self._malformed_counted: set[str] = set()
        self._hours_listed: dict[str, set[str]] = {}  # webhook hour prefix -> its ids

    def run(
        self,
        since: datetime,
        until: datetime,
        repair: bool,
        summary: Summary,
        checksums: bool = False,
    ) -> Findings:
        findings = Findings(repair_asked=repair)
        folders = PrefixListings(self.store, self.layout)
        self._dismissal_folders = PrefixListings(self.store, self.layout, kind="dismissals")
        self._quarantine = QuarantineIndex(self.store, self.layout)
        self._malformed_seen = set()
        self._malformed_counted = set()
        self._hours_listed = {}
        summary.window = {"from": iso_z(since), "until": iso_z(until)}
        pieces = list(chunks(since, until, DAY, aligned=True))
        summary.chunks_total = len(pieces)
        self.observer.started(summary, len(pieces))
        for done, (start, end) in enumerate(pieces, start=1):
            # The overlap second before a cut belongs to the day before it.
            nominal = start if done == 1 else start + OVERLAP
            self._day(nominal, start, end, repair, folders, findings, summary, checksums)
            self.archive.settle()  # the days it repaired into: due again
            summary.chunks_done += 1
            self.observer.committed(summary, done)
        return findings

    def _day(
        self,
        nominal: datetime,
        start: datetime,
        end: datetime,
        repair: bool,
        folders: PrefixListings,
        findings: Findings,
        summary: Summary,
        checksums: bool,
    ) -> None:
        row = DayRow(day=nominal.strftime("%Y-%m-%d"))
        found: dict[str, tuple[Alert, str]] = {}  # the lists threatstack.statuses names
        listed: dict[str, tuple[Alert, str]] = {}  # and the dismissed list, always
        if start < end:
            for status in self._lists:
                for page in self.source.list_alerts(status, start, end):
                    for raw in page:
                        item = classify(raw)
                        if not isinstance(item, Alert):
                            if item.digest not in self._malformed_counted:
                                self._malformed_counted.add(item.digest)  # once per object
                                findings.malformed += 1
                            if status in self.statuses:
                                self._malformed(item, status, repair, findings)
                        elif nominal <= item.created < end and item.id not in listed:
                            listed[item.id] = (item, status)
                            if status in self.statuses:
                                found[item.id] = (item, status)
                    self.observer.page(summary)
        row.api = len(found)
        summary.listed += len(found)

        webhook_ids = self._webhook_ids(nominal, end)
        judged_webhooks = {i for i, minute in webhook_ids.items() if minute is not None}
        wanted_folders = {alert_id[:4] for alert_id in listed} | _folders_for(nominal, end)
        archived_alerts: set[str] = set()
        for folder in wanted_folders:
            held = folders.ids(folder)
            archived_alerts |= (held & set(listed)) | self._in_day(held, nominal, end, webhook_ids)

        absent = [i for i in found if i not in archived_alerts or i not in webhook_ids]
        kept = self._quarantined(absent, found)
        row.quarantined = len(kept)
        for alert_id in sorted(kept):
            findings.note_quarantined(alert_id, kept[alert_id])
        summary.quarantined += len(kept)
        missing_alerts = [i for i in found if i not in archived_alerts and i not in kept]
        missing_webhooks = [i for i in found if i not in webhook_ids and i not in kept]
        # A pushed alert's webhook record is filed under the push's minute, which may fall
        # the other side of midnight from the API's createdAt: there, it stands (one webhook
        # key per alert; a repair writes only its full record, if that is missing), and a
        # second one here would put the alert in two days' tables.
        elsewhere = self._filed_elsewhere(missing_webhooks, found, nominal, end)
        missing_webhooks = [i for i in missing_webhooks if i not in elsewhere]
        unknown_alerts = [i for i in archived_alerts if i not in listed]
        unknown_webhooks = [i for i in judged_webhooks if i not in listed]
        for kind, missing, unknown in (
            ("alerts", missing_alerts, unknown_alerts),
            ("webhooks", missing_webhooks, unknown_webhooks),
        ):
            row.missing[kind] = len(missing)
            row.unknown[kind] = len(unknown)
            present = archived_alerts if kind == "alerts" else set(webhook_ids)
            row.archived[kind] = len(set(found) & present)
            findings.note("missing", kind, missing)
            findings.note("unknown", kind, unknown)
        findings.days.append(row)
        with_dismissal = self._dismissals(listed, archived_alerts, repair, row, findings, summary)

        if checksums:
            recorded = self._manifest(nominal.date(), findings)
            for alert_id in sorted(archived_alerts & set(listed)):
                self._check_sum(self.layout.alert_key(alert_id), findings, recorded)
            for alert_id in sorted(set(listed) & set(webhook_ids)):
                alert = listed[alert_id][0]
                key = self.layout.webhook_key(alert_id, alert.created)
                self._check_sum(key, findings, recorded)
            # Dismissal records come after their day closed: no manifest lists them, but S3's
            # stored checksum still tells a body changed since it was written.
            for alert_id in sorted(with_dismissal):
                self._check_sum(self.layout.dismissal_key(alert_id), findings, None)
        webhooks_to_write = set(missing_webhooks)
        to_repair = sorted(set(missing_alerts) | webhooks_to_write)
        findings.to_repair += len(to_repair)
        if repair:
            now = self.clock()
            for alert_id in to_repair:
                alert, status = found[alert_id]
                if alert_id in elsewhere:
                    # Its row is built from its webhook record's day: that day is marked as
                    # a day written into (ahead, at the day's settle, at the run's end).
                    self.archive.into_day(elsewhere[alert_id])
                # A webhook record found (in the day, in another minute, or across midnight)
                # stands: only the full record is written (one webhook key per alert).
                webhook = alert_id in webhooks_to_write
                outcome = self.archive.take(alert, status, now, webhook)
                if outcome is Outcome.ARCHIVED:
                    findings.repaired += 1
                    summary.archived += 1
                elif outcome is Outcome.QUARANTINED:
                    # Kept with its reason, as the sync keeps it: handled, not missing.
                    findings.quarantined_now += 1
                    summary.quarantined += 1
                    row.quarantined += 1
                    record = self._quarantine.read(self.archive.quarantine_key_of(alert))
                    if record is not None:
                        findings.note_quarantined(alert_id, record)
        summary.already_archived += len(found) - len(to_repair) - len(kept)

    def _malformed(self, item: Rejected, status: str, repair: bool, findings: Findings) -> None:
        """An object of the API's lists with no faithful form as an alert: the sync keeps it
        in the quarantine (SPEC "Bad input"). Not there: missing; --repair puts it there."""
        if item.digest in self._malformed_seen:  # the same object in another day's list
            return
        self._malformed_seen.add(item.digest)
        if self._quarantine.find(item.raw) is not None:
            return
        findings.malformed_not_quarantined += 1
        log.warning(
            "verify.malformed_not_quarantined",
            extra={"fields": {"reason": item.reason, "detail": item.detail, "status": status}},
        )
        if repair:
            self.archive.quarantine(item, status, self.clock())
            findings.malformed_quarantined_now += 1

    def _quarantined(
        self, absent: list[str], found: dict[str, tuple[Alert, str]]
    ) -> dict[str, Quarantined]:
        """Of the alerts with a record absent, those the quarantine holds (by the digest of
        the raw object as listed now: an alert that changed since it was quarantined, a
        dismissal, is quarantined again by ``--repair`` in its new form)."""
        kept = {}
        for alert_id in absent:
            record = self._quarantine.find(found[alert_id][0].raw)
            if record is not None:
                kept[alert_id] = record
        return kept

    def _dismissals(
        self,
        found: dict[str, tuple[Alert, str]],
        archived_alerts: set[str],
        repair: bool,
        row: DayRow,
        findings: Findings,
        summary: Summary,
    ) -> set[str]:
        """Dismissed in the API, archived active, no dismissal record: report (and repair).
        An alert whose full record is missing is repaired whole, as the dismissed version.
        Returns the ids of the day's dismissed alerts that have a dismissal record before
        the repair (``--checksums`` reads those)."""
        dismissed = {i: alert for i, (alert, status) in found.items() if status == "dismissed"}
        row.dismissed = len(dismissed)
        candidates = sorted(set(dismissed) & archived_alerts)
        with_record: set[str] = set()
        for folder in {alert_id[:4] for alert_id in candidates}:
            with_record |= self._dismissal_folders.ids(folder)
        with_record &= set(candidates)
        missing = []
        for alert_id in candidates:
            if alert_id in with_record:
                continue
            record = self.archive.archived_full(alert_id)
            if isinstance(record, dict) and record.get("isDismissed") is True:
                continue  # first archived dismissed: the full record shows the dismissal
            kept = self._quarantine.find(dismissed[alert_id].raw)
            if kept is not None:  # no faithful JSON form: its quarantine keeps it
                findings.note_quarantined(alert_id, kept)
                row.quarantined += 1
                continue
            missing.append(alert_id)
        row.dismissals_missing = len(missing)
        findings.dismissals_missing_count += len(missing)
        room = IDS_SHOWN - len(findings.dismissals_missing)
        findings.dismissals_missing.extend(missing[: max(room, 0)])
        if not repair:
            return with_record
        now = self.clock()
        for alert_id in missing:
            outcome = self.archive.take_dismissal(dismissed[alert_id], now)
            if outcome is Outcome.QUARANTINED:
                # No faithful JSON form (NaN, say): kept in the quarantine, handled.
                findings.dismissals_quarantined_now += 1
                summary.quarantined += 1
                record = self._quarantine.read(self.archive.quarantine_key_of(dismissed[alert_id]))
                if record is not None:
                    findings.note_quarantined(alert_id, record)
                continue
            findings.dismissals_repaired += 1
            if outcome is Outcome.ARCHIVED:
                summary.dismissals_archived += 1
        return with_record

    def _manifest(self, day: date, findings: Findings) -> dict[str, str] | None:
        """The records of ``day``'s manifest (None: the day has none), after checking that
        the manifest before it is still what this one recorded."""
        manifests = Manifests(self.store, self.layout)
        loaded = manifests.load(day)

        def broken(which: str) -> None:
            if which not in findings.manifest_chain_broken:
                findings.manifest_chain_broken.append(which)
                log.error("verify.manifest_changed", extra={"fields": {"day": which}})

        # The next day's manifest recorded this one's SHA-256: a manifest deleted, garbled or
        # rewritten is found even when only this day is verified.
        after = manifests.load(day + timedelta(days=1))
        link = after[0].get("previous") if after is not None else None
        link = link if isinstance(link, dict) and link.get("day") == day.isoformat() else None
        if link is not None and (loaded is None or sha256_hex(loaded[1]) != link.get("sha256")):
            broken(day.isoformat())
        if loaded is None:
            return None
        document, _ = loaded
        if document.get("version") != MANIFEST_VERSION or document.get("day") != day.isoformat():
            broken(day.isoformat())  # not what poller wrote: not JSON, or another day's
        previous = document.get("previous")
        if isinstance(previous, dict) and previous.get("day"):
            before = manifests.load(date.fromisoformat(str(previous["day"])))
            if before is None or sha256_hex(before[1]) != previous.get("sha256"):
                broken(str(previous["day"]))
        records = document.get("records")
        return {str(k): str(v) for k, v in records.items()} if isinstance(records, dict) else {}

    def _check_sum(self, key: str, findings: Findings, recorded: dict[str, str] | None) -> None:
        """Does the body still hash to the SHA-256 S3 stored when it was written, and to the
        one its day's manifest recorded when the day closed?"""
        stored = self.store.stored_checksum(key)
        if stored is None:
            return
        body, checksum = stored
        if recorded is not None:
            if key not in recorded:
                findings.not_in_manifest += 1
            else:
                findings.manifest_checked += 1
                if sha256_hex(body) != recorded[key]:
                    findings.manifest_mismatch.append(key)
                    log.error("verify.manifest_mismatch", extra={"fields": {"key": key}})
        findings.checksums_checked += 1
        if checksum is None:
            findings.checksum_absent += 1
        elif base64.b64encode(hashlib.sha256(body).digest()).decode() != checksum:
            findings.checksum_mismatch.append(key)
            log.error("verify.checksum_mismatch", extra={"fields": {"key": key}})

    def _webhook_ids(self, nominal: datetime, end: datetime) -> dict[str, datetime | None]:
        """Ids of webhook records created in [nominal, end) -> their minute, or None for a
        minute only partly inside (those are not judged as unknown)."""
        out: dict[str, datetime | None] = {}
        day = nominal.replace(hour=0, minute=0, second=0, microsecond=0)
        while day < end:
            prefix = self.layout.key("webhooks", day.strftime("%Y/%m/%d")) + "/"
            for key in self.store.list_keys(prefix):
                parts = key[len(prefix) :].split("/")
                if len(parts) != 3:
                    continue
                try:
                    minute = day.replace(hour=int(parts[0]), minute=int(parts[1]))
                except ValueError:
                    continue
                if minute + timedelta(minutes=1) <= nominal or minute >= end:
                    continue
                whole = nominal <= minute and minute + timedelta(minutes=1) <= end
                out[parts[2]] = minute if whole else None
            day += DAY
        return out

    def _filed_elsewhere(
        self,
        ids: list[str],
        found: dict[str, tuple[Alert, str]],
        nominal: datetime,
        end: datetime,
    ) -> dict[str, date]:
        """Of ``ids``, those with a webhook record in the hour of their creation, or the
        hour before or after it, where that hour is not wholly inside [nominal, end) (the
        window's own listing covers those) -> that record's day: one listing per hour."""
        filed: dict[str, date] = {}
        for alert_id in ids:
            created = found[alert_id][0].created
            for offset in (-1, 0, 1):
                probe = created + timedelta(hours=offset)
                hour = probe.replace(minute=0, second=0, microsecond=0)
                if nominal <= hour and hour + timedelta(hours=1) <= end:
                    continue
                prefix = self.layout.key("webhooks", probe.strftime("%Y/%m/%d/%H")) + "/"
                if prefix not in self._hours_listed:
                    names = {key.rsplit("/", 1)[-1] for key in self.store.list_keys(prefix)}
                    self._hours_listed[prefix] = names
                if alert_id in self._hours_listed[prefix]:
                    filed[alert_id] = probe.date()
        return filed

    @staticmethod
    def _in_day(
        ids: set[str], nominal: datetime, end: datetime, webhook_ids: dict[str, datetime | None]
    ) -> set[str]:
        """Archived full-record ids that belong to this day: by the ObjectId's creation
        second, or, for other ids, by a webhook record fully inside the day."""
        inside = set()
        for alert_id in ids:
            created = _object_id_time(alert_id)
            if created is not None:
                if nominal <= created < end:
                    inside.add(alert_id)
            elif webhook_ids.get(alert_id) is not None:
                inside.add(alert_id)
        return inside
