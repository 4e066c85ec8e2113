"""A harmless probe of the bucket: can we write, and does the store honour conditions?"""

from __future__ import annotations

from poller.archive.records import Layout
from poller.archive.store import ObjectStore, PreconditionFailed


def check_bucket(store: ObjectStore, layout: Layout, run_id: str) -> bool:
    """Write, re-write and delete one probe object under ``_poller/``; nothing else is
    touched. Returns whether both If-None-Match and If-Match were honoured."""
    key = f"{layout.probe_key}-{run_id}"
    body = b'{"probe": true}'
    etag = store.put(key, body, if_none_match=True)
    honoured = True
    try:
        try:
            store.put(key, body, if_none_match=True)
            honoured = False
        except PreconditionFailed:
            pass
        try:
            store.put(key, body, if_match='"0123456789abcdef0123456789abcdef"')
            honoured = False
        except PreconditionFailed:
            pass
    finally:
        store.delete(key)
    return honoured and bool(etag)
