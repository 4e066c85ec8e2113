"""A second reviewer's attempts to break issue 19 (dismissals), each stated as expected
behaviour. Unit-sized: an in-memory store and a fake source, no servers."""

from __future__ import annotations

import pytest

from poller.archive.records import Layout
from poller.archive.revisits import RevisitStore
from poller.archive.store import MemoryObjectStore
from poller.errors import UnreadableState


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
