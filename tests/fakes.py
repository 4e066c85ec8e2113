"""In-memory stand-ins shared by unit tests of verify: a store that keeps S3's stored
checksums, and an API with one alert."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from poller.archive.store import MemoryObjectStore
from poller.timeutil import iso_z


class StaleChecksums(MemoryObjectStore):
    """Keeps the checksum of the first body written; a later rewrite keeps it too (a body
    changed at rest, or by someone who did not send a new checksum)."""

    def __init__(self) -> None:
        super().__init__()
        self.sums: dict[str, str] = {}

    def put(self, key: str, body: bytes, **conditions: Any) -> str:
        self.sums.setdefault(key, base64.b64encode(hashlib.sha256(body).digest()).decode())
        return super().put(key, body, **conditions)

    def stored_checksum(self, key: str) -> tuple[bytes, str | None] | None:
        found = self.get(key)
        return None if found is None else (found.body, self.sums.get(key))


class OneAlert:
    """The API with one alert, in the list ``status`` names."""

    requests_sent = 0

    def __init__(self, doc: dict[str, Any], status: str = "active") -> None:
        self.doc, self.status = doc, status

    def list_alerts(self, status: str, since: Any, until: Any) -> Iterator[list[Any]]:
        yield [self.doc] if status == self.status else []


def alert_an_hour_old(now: datetime, fill: str, **fields: Any) -> dict[str, Any]:
    """An alert created an hour before ``now``, its ObjectId-like id padded with ``fill``."""
    created = now - timedelta(hours=1)
    return {
        "id": f"{int(created.timestamp()):08x}" + fill * 16,
        "createdAt": iso_z(created),
        **fields,
    }
