"""The daemon's record of its cycles failing in a row, for ``poller status``.

``poller status`` is another process: it cannot ask the daemon, so the daemon leaves its
health where status reads everything else. ``P/_poller/daemon.json`` (version 1)::

    {"version": 1, "run_id": "...", "host": "...", "at": "2026-11-25T12:00:00Z",
     "failed_cycles_in_a_row": 3,           # 0 once a cycle went well again
     "red_after": 5,                        # /healthz turns red at this many
     "last_outcome": "failed",              # ok | lease_held | failed | crashed
     "last_error": "Threat Stack rejected (401)"}

Written when the count changes (each failed cycle, and the first good one after; also the
first good cycle of a daemon restarted over a failing count), so a healthy daemon writes
nothing. Best effort: the failure is often the bucket itself, and
then the record stays as it was (its ``at`` says how old it is).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from poller.archive.records import Layout
from poller.archive.store import ObjectStore
from poller.timeutil import iso_z

log = logging.getLogger(__name__)

VERSION = 1


@dataclass(frozen=True)
class CycleRecord:
    """One daemon's last word on its cycles."""

    run_id: str
    host: str
    failed_in_a_row: int
    red_after: int
    last_outcome: str
    last_error: str | None


class FailureRecord:
    def __init__(self, store: ObjectStore, layout: Layout) -> None:
        self._store = store
        self._key = layout.key("_poller", "daemon.json")

    def write(self, record: CycleRecord, now: datetime) -> None:
        """Leave ``record`` for ``poller status``; never raises (logged instead)."""
        document = {
            "version": VERSION,
            "run_id": record.run_id,
            "host": record.host,
            "at": iso_z(now),
            "failed_cycles_in_a_row": record.failed_in_a_row,
            "red_after": record.red_after,
            "last_outcome": record.last_outcome,
            "last_error": record.last_error,
        }
        try:
            self._store.put(self._key, json.dumps(document, sort_keys=True).encode("utf-8"))
        except Exception as exc:  # noqa: BLE001 - a record for people; the log has it too
            log.warning("daemon.record_failed", extra={"fields": {"error": str(exc)}})

    def read(self) -> dict[str, Any] | None:
        """The stored record, None when no daemon left one (or it does not read)."""
        stored = self._store.get(self._key)
        if stored is None:
            return None
        try:
            document = json.loads(stored.body)
        except ValueError:
            return None
        if not isinstance(document, dict) or document.get("version") != VERSION:
            return None
        return document
