"""The archive: create-only writes of the two records of an alert, and of quarantined objects.

First sight wins: every write carries ``If-None-Match: *``, so a 412 simply means "already
archived" and re-reads, retries, restarts and concurrent runs never overwrite anything.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum

from poller.records import Alert, Layout, Rejected, json_body, quarantine_record, webhook_record
from poller.store import ObjectStore, PreconditionFailed


class Outcome(Enum):
    ARCHIVED = "archived"  # at least one of the two records was written now
    ALREADY_ARCHIVED = "already_archived"  # both records were there before
    QUARANTINED = "quarantined"


class Archive:
    def __init__(self, store: ObjectStore, layout: Layout, organization_id: str) -> None:
        self._store = store
        self.layout = layout
        self._organization_id = organization_id

    def _create(self, key: str, body: bytes) -> bool:
        try:
            self._store.put(key, body, if_none_match=True)
        except PreconditionFailed:
            return False
        return True

    def store_alert(self, alert: Alert) -> Outcome:
        """Write the full record, then the webhook record; each only if it is not there yet."""
        full = self._create(self.layout.alert_key(alert.id), json_body(alert.raw))
        webhook = self._create(
            self.layout.webhook_key(alert.id, alert.created),
            json_body(webhook_record(alert, self._organization_id)),
        )
        return Outcome.ARCHIVED if (full or webhook) else Outcome.ALREADY_ARCHIVED

    def quarantine(self, rejected: Rejected, status: str, seen_at: datetime) -> Outcome:
        """Keep what cannot be archived, with its reason, under ``_poller/quarantine/``."""
        key = self.layout.quarantine_key(rejected.reason, rejected.digest)
        self._create(key, json_body(quarantine_record(rejected, status, seen_at)))
        return Outcome.QUARANTINED
