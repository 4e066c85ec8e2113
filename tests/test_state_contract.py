"""One contract for the object store, the checkpoint and the lease, held by the in-memory
fake and by the real S3 implementation over a moto server process."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from poller.archive.probe import prove_store
from poller.archive.records import Layout
from poller.archive.state import CheckpointStore, Lease
from poller.archive.store import MemoryObjectStore, ObjectStore, PreconditionFailed, S3ObjectStore
from poller.errors import (
    ArchiveUnavailable,
    CheckpointConflict,
    ConditionalWritesUnsupported,
    LeaseHeld,
    LeaseLost,
    UnguardedStore,
    UnreadableState,
)
from poller.timeutil import utc_now

LAYOUT = Layout("tenant")
T0 = datetime(2026, 11, 25, 12, tzinfo=UTC)


def released(store: ObjectStore) -> bool:
    stored = store.get(LAYOUT.lease_key)
    return stored is None or json.loads(stored.body).get("released") is True


class StoreUnderTest:
    """A store plus a way to let time pass as *that store* sees it."""

    def __init__(self, store: ObjectStore, advance: Callable[[float], None]) -> None:
        self.store = store
        self.advance = advance


@pytest.fixture(params=["memory", "s3"])
def under_test(request: pytest.FixtureRequest) -> StoreUnderTest:
    if request.param == "memory":
        now = [utc_now()]

        def advance(seconds: float) -> None:
            now[0] += timedelta(seconds=seconds)

        return StoreUnderTest(MemoryObjectStore(clock=lambda: now[0]), advance)
    s3 = request.getfixturevalue("s3")
    bucket = request.getfixturevalue("bucket")
    return StoreUnderTest(S3ObjectStore(s3, bucket), time.sleep)


# ------------------------------------------------------------------ the store primitives


def test_create_only_write_keeps_the_first(under_test: StoreUnderTest):
    store = under_test.store
    etag = store.put("k", b"first", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        store.put("k", b"second", if_none_match=True)
    found = store.get("k")
    assert found is not None
    assert (found.body, found.etag) == (b"first", etag)


def test_if_match_swaps_only_the_expected_version(under_test: StoreUnderTest):
    store = under_test.store
    with pytest.raises(PreconditionFailed):
        store.put("k", b"x", if_match='"0000"')  # missing key
    first = store.put("k", b"one", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        store.put("k", b"two", if_match='"ffff"')
    second = store.put("k", b"two", if_match=first)
    assert second != first
    with pytest.raises(PreconditionFailed):
        store.put("k", b"three", if_match=first)  # stale ETag
    found = store.get("k")
    assert found is not None and found.body == b"two"


def test_conditional_delete(under_test: StoreUnderTest):
    store = under_test.store
    etag = store.put("k", b"one")
    with pytest.raises(PreconditionFailed):
        store.delete("k", if_match='"ffff"')
    store.delete("k", if_match=etag)
    assert store.get("k") is None
    store.delete("k")  # missing is fine


def test_listing(under_test: StoreUnderTest):
    for key in ("a/1", "a/2", "b/1"):
        under_test.store.put(key, b"{}")
    assert sorted(under_test.store.list_keys("a/")) == ["a/1", "a/2"]


def test_probe_finds_bodies_kept_and_conditions_honoured(under_test: StoreUnderTest):
    proof = prove_store(under_test.store, LAYOUT, "run1", checksums=True)
    assert [(f.name, f.ok) for f in proof.findings] == [
        ("write", True),
        ("read_back", True),
        ("create_only", True),
        ("compare_and_swap", True),
    ]
    assert proof.refusal(require_conditional_writes=True) is None
    assert under_test.store.list_keys("") == []  # the probe leaves nothing behind


def test_listing_with_etags_and_the_first_key(under_test: StoreUnderTest):
    store = under_test.store
    assert store.first_key("p/webhooks/") is None
    etags = {
        key: store.put(key, b"{}") for key in ("p/webhooks/2026/11/02/x", "p/webhooks/2026/11/01/y")
    }
    store.put("p/other", b"{}")
    listed = store.list_objects("p/webhooks/")
    assert [(o.key, o.etag) for o in listed] == sorted(etags.items())
    assert all(o.last_modified.tzinfo is not None for o in listed)
    assert store.first_key("p/webhooks/") == "p/webhooks/2026/11/01/y"


# ------------------------------------------------------------------ the checkpoint


def test_checkpoint_compare_and_swap(under_test: StoreUnderTest):
    checkpoints = CheckpointStore(under_test.store, LAYOUT)
    empty = checkpoints.load()
    assert empty.watermark is None and empty.etag is None
    first = checkpoints.commit(empty, T0, {"a1234": 1}, "run-a", "sync", T0)
    assert checkpoints.load().watermark == T0
    with pytest.raises(CheckpointConflict):
        checkpoints.commit(empty, T0, {}, "run-b", "sync", T0)  # created meanwhile
    second = checkpoints.commit(first, T0 + timedelta(minutes=5), {}, "run-a", "sync", T0)
    with pytest.raises(CheckpointConflict):
        checkpoints.commit(first, T0 + timedelta(hours=1), {}, "run-c", "sync", T0)  # stale
    loaded = checkpoints.load()
    assert loaded.watermark == T0 + timedelta(minutes=5)
    assert loaded.etag == second.etag
    assert loaded.document["updated_by"] == "run-a"


def test_checkpoint_never_moves_backwards(under_test: StoreUnderTest):
    checkpoints = CheckpointStore(under_test.store, LAYOUT)
    first = checkpoints.commit(checkpoints.load(), T0, {}, "r", "sync", T0)
    checkpoints.commit(first, T0 - timedelta(days=1), {}, "r", "backfill", T0)
    assert checkpoints.load().watermark == T0


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"{not json", "unreadable"),
        (b'{"version": 9, "watermark": null}', "newer poller"),
        (b'{"watermark": null}', "version None"),
        (b"2a\r\n{}\r\n0\r\n", "aws-chunked framing.*s3.checksums=false"),
        (b'{"version": 1, "watermark": "yesterday"}', "unreadable"),
        (b'{"version": 1, "watermark": null, "seen": {"a": "x"}}', "unreadable"),
    ],
)
def test_a_bad_checkpoint_stops_the_run(under_test: StoreUnderTest, body: bytes, match: str):
    under_test.store.put(LAYOUT.checkpoint_key, body)
    with pytest.raises(UnreadableState, match=match) as raised:
        CheckpointStore(under_test.store, LAYOUT).load()
    assert LAYOUT.checkpoint_key in str(raised.value) and "delete it" in str(raised.value)
    stored = under_test.store.get(LAYOUT.checkpoint_key)
    assert stored is not None and stored.body == body  # never replaced


# ------------------------------------------------------------------ the lease


def lease(store: ObjectStore, run_id: str, ttl: int = 2) -> Lease:
    holder = {"run_id": run_id, "mode": "sync", "host": "test", "pid": 1}
    return Lease(store, LAYOUT, ttl, holder, utc_now)


def test_lease_is_exclusive_until_released(under_test: StoreUnderTest):
    first, second = lease(under_test.store, "a"), lease(under_test.store, "b")
    first.acquire()
    with pytest.raises(LeaseHeld, match="run a"):
        second.acquire()
    first.renew()
    first.release()
    second.acquire()
    stored = under_test.store.get(LAYOUT.lease_key)
    assert stored is not None
    document: dict[str, Any] = json.loads(stored.body)
    assert {"run_id", "mode", "host", "pid", "expires_at", "ttl_seconds"} <= set(document)
    assert document["run_id"] == "b"


def test_a_stale_lease_is_taken_over_and_its_holder_is_fenced(under_test: StoreUnderTest):
    holder, contender = lease(under_test.store, "a", ttl=1), lease(under_test.store, "b", ttl=1)
    holder.acquire()
    under_test.advance(2.5)  # the holder "pauses" past its ttl
    contender.acquire()
    with pytest.raises(LeaseLost):
        holder.renew()
    holder.release()  # must not delete the new holder's lease
    info = contender.inspect()
    assert info is not None and info.document["run_id"] == "b"
    with pytest.raises(LeaseHeld):
        lease(under_test.store, "c", ttl=1).acquire()


def test_a_fresh_lease_is_not_taken_over(under_test: StoreUnderTest):
    holder = lease(under_test.store, "a", ttl=30)
    holder.acquire()
    under_test.advance(1.2)
    with pytest.raises(LeaseHeld):
        lease(under_test.store, "b", ttl=30).acquire()


def test_store_without_conditions_is_refused_unless_allowed():
    store = MemoryObjectStore()
    store.ignore_conditions = True
    proof = prove_store(store, LAYOUT, "r", checksums=True)
    assert not proof.conditional_writes and proof.keeps_bodies
    refusal = proof.refusal(require_conditional_writes=True)
    assert isinstance(refusal, UnguardedStore)
    assert "ignores If-None-Match" in str(refusal)
    assert "require_conditional_writes=false" in str(refusal)
    assert proof.refusal(require_conditional_writes=False) is None


@pytest.mark.parametrize(
    "body",
    [b"{not json", b'{"version": 7, "run_id": "x"}', b'{"version": 1}', b"1a\r\n{}\r\n0\r\n"],
    ids=["not-json", "other-version", "no-run-id", "framing"],
)
def test_an_unreadable_lease_is_named_never_held_by_none_and_never_replaced(
    under_test: StoreUnderTest, body: bytes
):
    under_test.store.put(LAYOUT.lease_key, body)
    under_test.advance(2.5)  # stale too: still not taken over silently
    with pytest.raises(UnreadableState, match=r"lease tenant/_poller/lease\.json is unreadable"):
        lease(under_test.store, "a", ttl=1).acquire()
    stored = under_test.store.get(LAYOUT.lease_key)
    assert stored is not None and stored.body == body
    info = lease(under_test.store, "a").inspect()
    assert info is not None and info.problem and "None" not in info.problem


def test_a_store_that_answers_if_match_with_501_does_not_keep_the_lease_held():
    store = MemoryObjectStore()
    holder = lease(store, "a", ttl=60)
    holder.acquire()
    store.lacks_if_match = True
    with pytest.raises(ConditionalWritesUnsupported, match="require_conditional_writes=false"):
        holder.renew()
    holder.release()
    assert released(store)


# ------------------------------------------------------------------ lost responses


class LostResponses:
    """Wraps a store: chosen writes land, but their response is lost and the retry (as
    botocore sends it, same body, same condition) meets our own write and gets 412."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.lose = 0  # how many of the next writes lose their response

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def put(self, key: str, body: bytes, **conditions: Any) -> str:
        etag = self.inner.put(key, body, **conditions)
        if self.lose:
            self.lose -= 1
            return self.inner.put(key, body, **conditions)  # the retry: raises 412
        return etag


def test_a_lost_response_to_our_own_writes_is_not_a_conflict(under_test: StoreUnderTest):
    store = LostResponses(under_test.store)
    lease = Lease(store, LAYOUT, 60, {"run_id": "mine"}, utc_now)  # type: ignore[arg-type]
    store.lose = 1
    lease.acquire()  # not "another run holds the lease: run mine"
    assert lease.held
    store.lose = 1
    lease.renew()  # not LeaseLost
    checkpoints = CheckpointStore(store, LAYOUT)  # type: ignore[arg-type]
    store.lose = 1
    first = checkpoints.commit(checkpoints.load(), T0, {}, "mine", "sync", T0)
    store.lose = 1
    second = checkpoints.commit(first, T0 + timedelta(minutes=5), {}, "mine", "sync", T0)
    assert checkpoints.load().etag == second.etag
    assert checkpoints.load().watermark == T0 + timedelta(minutes=5)
    lease.release()
    assert released(under_test.store)  # nothing orphaned


class UnansweredWrites:
    """Wraps a store: chosen writes land, then the caller sees S3 fail (what botocore raises
    once every retry of a write whose first attempt landed went unanswered); ``down`` makes
    every request fail without landing."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner = inner
        self.unanswered = 0  # how many of the next writes land without an answer
        self.down = False
        self.fail_reads = 0  # how many of the next reads fail
        self.puts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def get(self, key: str) -> Any:
        if self.fail_reads:
            self.fail_reads -= 1
            raise ArchiveUnavailable(f"S3 unreachable for reading {key}: ReadTimeoutError")
        if self.down:
            raise ArchiveUnavailable(f"S3 unreachable for reading {key}: ReadTimeoutError")
        return self.inner.get(key)

    def put(self, key: str, body: bytes, **conditions: Any) -> str:
        self.puts += 1
        if self.down:
            raise ArchiveUnavailable(f"S3 failed writing {key}: 503")
        etag = self.inner.put(key, body, **conditions)
        if self.unanswered:
            self.unanswered -= 1
            raise ArchiveUnavailable(f"S3 unreachable for writing {key}: ConnectionClosedError")
        return etag


def test_a_renewal_that_landed_unanswered_is_not_a_lost_lease(under_test: StoreUnderTest):
    """The renewal landed but the run saw an error: the lease read back carries this
    holding's token, so it is ours under its new ETag, and the next renewal and the release
    work (before, the next renewal's If-Match on the old ETag failed: "lease lost")."""
    store = UnansweredWrites(under_test.store)
    lease = Lease(store, LAYOUT, 60, {"run_id": "mine"}, utc_now)  # type: ignore[arg-type]
    lease.acquire()
    store.unanswered = 1
    lease.renew()  # neither LeaseLost nor the S3 error
    lease.renew()
    lease.confirm()
    # Landed unanswered and the read-back failed too: the outcome is unknown for now; the
    # next renewal meets our own write (412), takes its ETag and renews on it.
    store.unanswered, store.fail_reads = 1, 1
    with pytest.raises(ArchiveUnavailable):
        lease.renew()
    before = store.puts
    lease.renew()
    assert store.puts == before + 2  # the 412, then the renewal on the adopted ETag
    lease.renew()
    assert store.puts == before + 3
    lease.release()
    assert released(under_test.store)
    taken = json.loads(under_test.store.get(LAYOUT.lease_key).body)  # type: ignore[union-attr]
    assert taken["run_id"] == "mine" and len(taken["token"]) == 32


def test_a_renewal_that_failed_while_another_run_took_over_is_a_lost_lease(
    under_test: StoreUnderTest,
):
    store = under_test.store
    holder = Lease(UnansweredWrites(store), LAYOUT, 1, {"run_id": "a"}, utc_now)  # type: ignore[arg-type]
    holder.acquire()
    under_test.advance(2.5)  # stale by the store's clock
    Lease(store, LAYOUT, 1, {"run_id": "b"}, utc_now).acquire()
    holder._store.down = True  # type: ignore[attr-defined]
    with pytest.raises(ArchiveUnavailable):
        holder.renew()  # the outcome cannot be known yet: the run's caller retries
    holder._store.down = False  # type: ignore[attr-defined]
    with pytest.raises(LeaseLost, match="taken over"):
        holder.renew()
    assert not holder.held
    holder.release()  # must not touch b's lease
    assert json.loads(store.get(LAYOUT.lease_key).body)["run_id"] == "b"  # type: ignore[union-attr]


def test_the_between_page_check_is_free_until_the_last_renewal_is_old():
    """``confirm`` sends nothing while the last renewal is younger than ttl/2; past it
    (a paused process) it renews, and finds a lease taken over meanwhile; when renewals
    keep failing for a whole ttl, another run may hold it: LeaseLost."""
    mono = [100.0]
    now = [utc_now()]
    memory = MemoryObjectStore(clock=lambda: now[0])
    store = UnansweredWrites(memory)
    lease = Lease(
        store,  # type: ignore[arg-type]
        LAYOUT,
        60,
        {"run_id": "a"},
        lambda: now[0],
        monotonic=lambda: mono[0],
    )
    lease.acquire()
    puts = store.puts
    for _ in range(5):
        mono[0] += 5
        lease.confirm()
    assert store.puts == puts  # 25 s < 30 s: nothing sent
    mono[0] += 10
    lease.confirm()
    assert store.puts == puts + 1  # one renewal, and fresh again
    lease.confirm()
    assert store.puts == puts + 1
    # Paused for two minutes; another run took the stale lease over.
    mono[0] += 120
    now[0] += timedelta(seconds=120)
    Lease(memory, LAYOUT, 60, {"run_id": "b"}, lambda: now[0]).acquire()
    with pytest.raises(LeaseLost, match="taken over"):
        lease.confirm()
    # Renewals failing: tolerated while the lease cannot be stale, LeaseLost after a ttl.
    failing = Lease(
        store,  # type: ignore[arg-type]
        Layout("other"),
        60,
        {"run_id": "c"},
        lambda: now[0],
        monotonic=lambda: mono[0],
    )
    failing.acquire()
    store.down = True
    mono[0] += 40
    failing.confirm()  # 40 s: not stale yet, the next page tries again
    mono[0] += 25
    with pytest.raises(LeaseLost, match="could not renew its lease for 65s"):
        failing.confirm()


def test_a_real_conflict_is_still_a_conflict(under_test: StoreUnderTest):
    store = under_test.store
    checkpoints = CheckpointStore(store, LAYOUT)
    first = checkpoints.commit(checkpoints.load(), T0, {}, "mine", "sync", T0)
    checkpoints.commit(first, T0 + timedelta(minutes=1), {}, "theirs", "sync", T0)
    with pytest.raises(CheckpointConflict):
        checkpoints.commit(first, T0 + timedelta(minutes=2), {}, "mine", "sync", T0)
    Lease(store, LAYOUT, 60, {"run_id": "theirs"}, utc_now).acquire()
    with pytest.raises(LeaseHeld, match="run theirs"):
        Lease(store, LAYOUT, 60, {"run_id": "mine"}, utc_now).acquire()


def test_a_released_lease_is_taken_at_once_and_hands_over_the_request_times(
    under_test: StoreUnderTest,
):
    store = under_test.store
    first = Lease(store, LAYOUT, 60, {"run_id": "a"}, utc_now, recent_requests=lambda: [1.5, 2.5])
    first.acquire()
    first.release()
    second = Lease(store, LAYOUT, 60, {"run_id": "b"}, utc_now)
    second.acquire()  # no wait for a ttl: released means free
    assert second.inherited_requests == [1.5, 2.5]
    with pytest.raises(LeaseHeld, match="run b"):
        Lease(store, LAYOUT, 60, {"run_id": "c"}, utc_now).acquire()
    second.release()
    assert released(store)
