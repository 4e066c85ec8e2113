"""Dismissals at their edges (verify --checksums, an unreadable or future revisit state,
only the active list polled, a dismissed version with no JSON form): each test reproduced a
defect a break-it review of issue 19 found, stated as expected behaviour. Unit-sized: an
in-memory store and a fake source, no servers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from fakes import OneAlert, StaleChecksums, alert_an_hour_old

from poller.archive.records import Layout
from poller.archive.revisits import RevisitStore
from poller.archive.store import MemoryObjectStore
from poller.archive.writer import Archive
from poller.errors import UnreadableState
from poller.timeutil import iso_z, utc_now
from poller.walks.revisit import Revisit, RevisitSettings
from poller.walks.sync import Summary
from poller.walks.verify import Verifier

DISMISSED = ("active", "dismissed")


def _archived_active_then_dismissed(
    letter: str, **dismissal: Any
) -> tuple[StaleChecksums, OneAlert, Verifier, datetime, datetime]:
    """One alert archived active by ``verify --repair``, then dismissed in the API with
    ``dismissal``'s fields: (store, source, verifier, since, until) for the next verify."""
    now = utc_now().replace(microsecond=0)
    doc = alert_an_hour_old(now, letter)
    store = StaleChecksums()
    source = OneAlert(doc)
    verifier = Verifier(source, store, Archive(store, Layout(), "org"), DISMISSED, lambda: now)
    since, until = now - timedelta(hours=2), now
    assert verifier.run(since, until, True, Summary("verify", "r")).complete  # archived active
    source.doc = {**doc, "isDismissed": True, "dismissedBy": "eve", **dismissal}
    source.status = "dismissed"
    return store, source, verifier, since, until


def test_verify_checksums_reads_dismissal_records_too():
    """README: ``--checksums`` "reads every archived record of the range" and reports a body
    that no longer hashes to the checksum S3 stored. The dismissal record is the one an
    auditor asks about (who closed it, why): a changed one must be reported like a changed
    full record."""
    store, source, verifier, since, until = _archived_active_then_dismissed(
        "b", dismissReason="OTHER"
    )
    repaired = verifier.run(since, until, True, Summary("verify", "r"))
    assert repaired.dismissals_repaired == 1
    key = Layout().dismissal_key(source.doc["id"])
    assert verifier.run(since, until, False, Summary("verify", "r"), True).complete
    store.put(key, json.dumps({**source.doc, "dismissedBy": "mallory"}).encode())
    findings = verifier.run(since, until, False, Summary("verify", "r"), True)
    assert findings.checksum_mismatch == [key] and not findings.complete


@pytest.mark.parametrize(
    "document, detail",
    [
        (b"{not json", "JSON"),
        (b'{"version": 1, "handled": {"6b0a3f3c7b8f2ab53451d013": "soon"}}', "handled: "),
        (b'{"version": 1, "current": {"from": "2026-11-01T00:00:00"}}', "current: KeyError"),
        (b'{"version": 1, "last": {"from": 3}}', "last: TypeError: from is not text"),
    ],
)
def test_an_unreadable_revisit_state_says_what_does_not_read(document: bytes, detail: str):
    """README: an unreadable ``revisit.json`` "is named there with the reason". A bare
    exception name (``ValueError``) does not tell an operator which field to look at."""
    store = MemoryObjectStore()
    store.put(Layout().revisit_key, document)
    with pytest.raises(UnreadableState) as caught:
        RevisitStore(store, Layout()).load()
    assert detail in str(caught.value)
    assert "_poller/revisit.json" in str(caught.value)


class Dismissed:
    """The API's dismissed list holding ``docs``; the active list empty."""

    requests_sent = 0

    def __init__(self, docs: list[dict[str, Any]]) -> None:
        self.docs = docs

    def list_alerts(self, status: str, since: Any, until: Any) -> Iterator[list[Any]]:
        yield list(self.docs) if status == "dismissed" else []


class Guard:
    def fence(self) -> None:
        pass

    def stopping(self) -> bool:
        return False

    def progress(self, summary: Summary) -> None:
        pass


def test_a_last_revisit_dated_in_the_future_does_not_switch_the_revisit_off():
    """A ``last.started_at`` far ahead of the clock (a hand edit, a host whose clock was once
    a month ahead) made ``now - started`` negative: no revisit was due until that date, and
    every dismissal in between was left to ``verify``. An instant later than now by more
    than clocks can disagree is not believed: the revisit is due."""
    now = utc_now().replace(microsecond=0)
    created = now - timedelta(days=2)
    active = {"id": f"{int(created.timestamp()):08x}" + "c" * 16, "createdAt": iso_z(created)}
    dismissed = {**active, "isDismissed": True, "dismissedBy": "eve"}
    store = MemoryObjectStore()
    layout = Layout()
    archive = Archive(store, layout, "org")
    store.put(layout.alert_key(active["id"]), json.dumps(active).encode())
    future = iso_z(now + timedelta(days=30))
    last = {"from": future, "until": future, "started_at": future, "run_id": "r"}
    body = json.dumps({"version": 1, "handled": {}, "current": None, "last": last})
    store.put(layout.revisit_key, body.encode())
    states = RevisitStore(store, layout)
    revisit = Revisit(
        Dismissed([dismissed]),
        archive,
        states,
        RevisitSettings(14, timedelta(hours=1)),
        lambda: now,
        "run",
    )
    summary = Summary("sync", "run")
    revisit.run(now, now - timedelta(minutes=15), summary, Guard())
    assert summary.revisit is not None and summary.revisit["due"] is True
    assert json.loads(store.get(layout.dismissal_key(active["id"])).body) == dismissed


def test_verify_reports_a_late_dismissal_when_only_the_active_list_is_polled():
    """SPEC Dismissals: dismissals later than ``sync.revisit_days`` are what ``verify``
    reports. Like the revisit, verify reads the dismissed list whatever
    ``threatstack.statuses`` says: the alert archived active and dismissed since is reported
    as a missing dismissal, not as an id the API does not know."""
    now = utc_now().replace(microsecond=0)
    doc = alert_an_hour_old(now, "d")
    store = MemoryObjectStore()
    archive = Archive(store, Layout(), "org")
    source = OneAlert(doc)
    verifier = Verifier(source, store, archive, ("active",), lambda: now)  # as app builds it
    since, until = now - timedelta(hours=2), now
    assert verifier.run(since, until, True, Summary("verify", "r")).complete  # archived active
    source.doc, source.status = {**doc, "isDismissed": True}, "dismissed"
    findings = verifier.run(since, until, False, Summary("verify", "r"))
    assert findings.dismissals_missing == [doc["id"]]
    assert findings.unknown_count["alerts"] == 0


def test_verify_with_only_the_active_list_calls_no_dismissed_alert_missing():
    """The dismissed list read for dismissals only: a dismissed alert never archived (the
    user polls active alerts only) is not reported missing, and --repair writes nothing."""
    now = utc_now().replace(microsecond=0)
    doc = alert_an_hour_old(now, "e")
    store = MemoryObjectStore()
    source = OneAlert({**doc, "isDismissed": True})
    source.status = "dismissed"
    verifier = Verifier(source, store, Archive(store, Layout(), "org"), ("active",), lambda: now)
    findings = verifier.run(now - timedelta(hours=2), now, True, Summary("verify", "r"))
    assert findings.complete
    assert (findings.missing_count["alerts"], findings.dismissals_missing_count) == (0, 0)
    assert list(store.list_keys("")) == []


def test_verify_repair_converges_on_a_dismissal_with_no_json_form():
    """An alert archived while active whose dismissed version has no faithful JSON form (a
    NaN the API's parser accepts): ``--repair`` quarantines that version (kept, not only
    logged) and counts it handled; the next run finds it in the quarantine and exits 0,
    instead of exit 1 on every run (issue 17, item 5)."""
    store, _, verifier, since, until = _archived_active_then_dismissed("f", score=float("nan"))
    audit = verifier.run(since, until, False, Summary("verify", "r"))
    assert not audit.complete and audit.dismissals_missing_count == 1
    first = verifier.run(since, until, True, Summary("verify", "r"))
    assert first.complete and first.dismissals_quarantined_now == 1
    (kept,) = [k for k in store.list_keys("") if k.startswith("_poller/quarantine/")]
    assert kept.startswith("_poller/quarantine/unencodable/")
    assert json.loads(store.get(kept).body.replace(b"NaN", b"null"))["status"] == "dismissed"
    second = verifier.run(since, until, True, Summary("verify", "r"))
    assert second.complete and second.dismissals_missing_count == 0
    assert second.quarantined_count == 1 and second.dismissals_quarantined_now == 0


def test_the_revisit_quarantines_a_dismissed_version_with_no_json_form():
    """The revisit meets the same NaN: the dismissed version is quarantined (reported as
    ``unencodable``), the other dismissal of the list is archived, and verify then finds
    nothing missing."""
    now = utc_now().replace(microsecond=0)
    created = now - timedelta(days=2)
    actives = [
        {"id": f"{int(created.timestamp()):08x}" + c * 16, "createdAt": iso_z(created)}
        for c in "de"
    ]
    store = MemoryObjectStore()
    layout = Layout()
    archive = Archive(store, layout, "org")
    for active in actives:
        store.put(layout.alert_key(active["id"]), json.dumps(active).encode())
    bad = {**actives[0], "isDismissed": True, "score": float("nan")}
    good = {**actives[1], "isDismissed": True, "dismissedBy": "eve"}
    revisit = Revisit(
        Dismissed([bad, good]),
        archive,
        RevisitStore(store, layout),
        RevisitSettings(14, timedelta(hours=1)),
        lambda: now,
        "run",
    )
    summary = Summary("sync", "run")
    revisit.run(now, now - timedelta(minutes=15), summary, Guard())
    assert summary.revisit is not None
    assert (summary.revisit["archived"], summary.revisit["unencodable"]) == (1, 1)
    assert store.get(layout.dismissal_key(actives[0]["id"])) is None
    (kept,) = [k for k in store.list_keys("") if k.startswith("_poller/quarantine/")]
    assert kept.startswith("_poller/quarantine/unencodable/")
