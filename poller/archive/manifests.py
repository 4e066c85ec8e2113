"""Tamper-evidence per closed UTC day: a manifest written once, chained to the day before.

``verify --checksums`` compares each body with the checksum stored with it, but an overwrite
carries its own matching checksum. A manifest, written create-only when a day closes, keeps
what the day held then::

    P/_poller/manifests/2026-11-24.json  (version 1)
    {"version": 1, "day": "2026-11-24",
     "records": {"<key>": "<SHA-256 hex of its body>", ...},  # every webhook record of the
                                                              # day and its alert's full record
     "previous": {"day": "2026-11-23", "sha256": "<hex of that manifest's bytes>"} | null,
     "written_at": "...", "written_by": "<run id>"}

A record changed later no longer matches its day's manifest; a manifest changed later no
longer matches the SHA-256 the next day's manifest recorded. What it cannot see: someone who
rewrites a record *and* every manifest since; a copy of a later manifest kept elsewhere (see
README, *What the manifests prove*) catches that too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timedelta
from typing import Any

from poller.archive.records import Layout
from poller.archive.store import ObjectStore, PreconditionFailed
from poller.timeutil import iso_z

MANIFEST_VERSION = 1
DAYS_PER_RUN = 3  # at most this many days are closed by one run (and the first run's start)


def sha256_hex(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def closed_through(watermark: datetime, lookback: timedelta) -> date:
    """The last UTC day that is closed: the watermark is past its end by the look-back."""
    return (watermark - lookback - timedelta(days=1)).date()


class Manifests:
    def __init__(self, store: ObjectStore, layout: Layout, workers: int = 8) -> None:
        self._store = store
        self._layout = layout
        self._prefix = layout.key("_poller", "manifests") + "/"
        self._workers = workers

    def key(self, day: date) -> str:
        return f"{self._prefix}{day.isoformat()}.json"

    def days(self) -> list[date]:
        found = []
        for key in self._store.list_keys(self._prefix):
            name = key[len(self._prefix) :].removesuffix(".json")
            try:
                found.append(date.fromisoformat(name))
            except ValueError:
                continue
        return sorted(found)

    def load(self, day: date) -> tuple[dict[str, Any], bytes] | None:
        """The manifest of ``day`` and its bytes; None when there is none. A manifest that
        does not parse is returned as an empty document (its bytes still chain)."""
        stored = self._store.get(self.key(day))
        if stored is None:
            return None
        try:
            document = json.loads(stored.body)
        except ValueError:
            document = {}
        return (document if isinstance(document, dict) else {}), stored.body

    def record_keys(self, day: date) -> list[str]:
        """Every webhook record of ``day`` and the full record of each of its alerts."""
        prefix = self._layout.key("webhooks", day.strftime("%Y/%m/%d")) + "/"
        keys = []
        for key in self._store.list_keys(prefix):
            keys.append(key)
            keys.append(self._layout.alert_key(key.rsplit("/", 1)[-1]))
        return keys

    def digests(self, keys: list[str]) -> dict[str, str]:
        """Key -> SHA-256 hex of its body, for the keys that exist."""

        def read(key: str) -> tuple[str, str | None]:
            stored = self._store.get(key)
            return key, None if stored is None else sha256_hex(stored.body)

        with ThreadPoolExecutor(max_workers=self._workers) as pool:
            return {key: digest for key, digest in pool.map(read, keys) if digest is not None}

    def close_days(self, through: date, run_id: str, now: datetime) -> list[date]:
        """Write the manifests of the closed days after the last one, oldest first, at most
        DAYS_PER_RUN (the first ever starts DAYS_PER_RUN days back). Returns the days written."""
        days = self.days()
        last = days[-1] if days else None
        start = last + timedelta(days=1) if last else through - timedelta(days=DAYS_PER_RUN - 1)
        written: list[date] = []
        for day in _days(start, through):
            if len(written) == DAYS_PER_RUN:
                break
            previous = None
            if last is not None:
                loaded = self.load(last)
                if loaded is not None:
                    previous = {"day": last.isoformat(), "sha256": sha256_hex(loaded[1])}
            document = {
                "version": MANIFEST_VERSION,
                "day": day.isoformat(),
                "records": self.digests(self.record_keys(day)),
                "previous": previous,
                "written_at": iso_z(now),
                "written_by": run_id,
            }
            body = json.dumps(document, sort_keys=True).encode("utf-8")
            try:
                self._store.put(self.key(day), body, if_none_match=True, retain=True)
                written.append(day)
            except PreconditionFailed:
                pass  # another run closed it first: first write wins
            last = day
        return written


def _days(start: date, through: date) -> Iterator[date]:
    day = start
    while day <= through:
        yield day
        day += timedelta(days=1)
