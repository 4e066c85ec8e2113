"""What the quarantine holds for an object, found by the object's content address.

A quarantined object is kept at ``P/_poller/quarantine/REASON/SHA256`` (``Archive.quarantine``),
SHA256 being ``Rejected.digest``: a function of the raw object alone, whatever the reason. An
alert the API lists whose records are absent may be there: an alert with no faithful JSON form
(``unencodable``), or one that met a bug while it was archived (``internal_error``). The
folder is listed once, when first asked, and indexed by digest; each hit costs one GET of its
record, for the reason and detail it was kept with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from poller.archive.records import Layout, Rejected
from poller.archive.store import ObjectStore


@dataclass(frozen=True)
class Quarantined:
    """One quarantine record, as ``quarantine_record`` wrote it (``status`` is the list the
    object came from, or ``push``; ``seen_at`` ISO 8601)."""

    key: str
    reason: str
    detail: str
    status: str
    seen_at: str

    def report(self, alert_id: str) -> dict[str, str]:
        return {"id": alert_id, **self.__dict__}


class QuarantineIndex:
    """Digest -> quarantine key, from one listing of ``P/_poller/quarantine/`` (a LIST per
    1,000 objects), made on the first lookup and kept for the life of the index."""

    def __init__(self, store: ObjectStore, layout: Layout) -> None:
        self._store = store
        self._prefix = layout.key("_poller", "quarantine") + "/"
        self._keys: dict[str, str] | None = None

    def find(self, raw: Any) -> Quarantined | None:
        """The record under which ``raw`` (an object as the API returned it) is kept, or
        None when the quarantine does not hold it."""
        if self._keys is None:
            self._keys = {}
            for key in self._store.list_keys(self._prefix):
                self._keys[key.rsplit("/", 1)[1]] = key
        found = self._keys.get(Rejected("", "", raw).digest)
        return self.read(found) if found is not None else None

    def read(self, key: str) -> Quarantined | None:
        """The record at ``key`` (one GET), remembered for later lookups; None if absent."""
        found = self._store.get(key)
        if found is None:
            return None
        if self._keys is not None:
            self._keys[key.rsplit("/", 1)[1]] = key
        try:
            document = json.loads(found.body)
        except ValueError:
            document = {}
        document = document if isinstance(document, dict) else {}
        # The reason is in the key too: a record altered since still says why it is there.
        reason = key[len(self._prefix) :].split("/", 1)[0]
        return Quarantined(
            key=key,
            reason=str(document.get("reason") or reason),
            detail=str(document.get("detail") or ""),
            status=str(document.get("status") or ""),
            seen_at=str(document.get("seen_at") or ""),
        )
