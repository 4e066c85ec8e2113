"""Reading the archive back (the old receiver's read routes): the webhook records of a time
range, found through the time-partitioned ``webhooks/YYYY/MM/DD/HH/MM/ID`` keys."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta
from typing import Any

from poller.archive.records import Layout
from poller.archive.store import ObjectStore


def archived_webhooks(
    store: ObjectStore, layout: Layout, start: datetime, end: datetime, limit: int
) -> list[Any]:
    """Webhook records created in [start, end), oldest first, at most ``limit``: one LIST per
    UTC day (per 1,000 keys) and one GET per record returned."""
    found: list[Any] = []
    day = start.replace(hour=0, minute=0, second=0, microsecond=0)
    while day < end and len(found) < limit:
        prefix = layout.key("webhooks", day.strftime("%Y/%m/%d")) + "/"
        for key in sorted(store.list_keys(prefix)):
            parts = key[len(prefix) :].split("/")
            if len(parts) != 3 or not (parts[0].isdigit() and parts[1].isdigit()):
                continue
            minute = day.replace(hour=int(parts[0]), minute=int(parts[1]))
            if minute + timedelta(minutes=1) <= start or minute >= end:
                continue
            stored = store.get(key)
            if stored is not None:
                found.append(json.loads(stored.body))
            if len(found) >= limit:
                break
        if day.date() == date.max:  # the last day there is
            break
        day += timedelta(days=1)
    return found
