"""The checkpoint (compare-and-swap on its ETag) and the single-writer lease.

Checkpoint document, ``P/_poller/checkpoint.json`` (version 1)::

    {"version": 1,
     "watermark": "2026-11-25T12:00:00Z",      # every alert created before it is archived
     "seen": {"<alert id>": 1764072000, ...},   # ids archived inside the lookback, with
                                                # their creation time (unix seconds)
     "updated_at": "...", "updated_by": "<run id>", "mode": "sync",
     "statuses": ["active", "dismissed"],      # the alert lists the watermark covers
     "run": {"listed": 3, "archived": 3, ...}}  # counts of the committing run so far

Lease document, ``P/_poller/lease.json`` (version 1)::

    {"version": 1, "run_id": "...", "mode": "sync", "host": "...", "pid": 123,
     "token": "<hex>",                           # new at every acquire: which holding
     "acquired_at": "...", "renewed_at": "...", "ttl_seconds": 120, "expires_at": "...",
     "recent_requests": [1764072000.123, ...],   # API request starts of the last minute
     "released": true}                           # only once its holder let go

A holder lets go by overwriting the lease (``If-Match``) with ``released: true`` rather than
deleting it, so the next run, which takes a released lease at once, inherits the request
times of the last minute and the request budget holds across processes taking turns.

Whether a lease is stale is judged by S3's clock only: the age of the object is the
``Date`` of the read minus its ``Last-Modified``, both stamped by the server.

A renewal whose outcome is unknown (S3 failed or timed out after botocore's retries: the
write may have landed) is settled by reading the lease back: while it carries our ``token``,
no other run has written it since, so it is still ours, under whatever ETag it has now.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from poller.archive.records import Layout, parse_compact
from poller.archive.store import (
    ObjectStore,
    PreconditionFailed,
    StoredObject,
    looks_like_chunk_framing,
)
from poller.errors import (
    ArchiveUnavailable,
    CheckpointConflict,
    ConditionalWritesUnsupported,
    LeaseHeld,
    LeaseLost,
    UnreadableState,
)
from poller.timeutil import Clock, iso_z

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
LEASE_VERSION = 1


def our_write_landed(store: ObjectStore, key: str, body: bytes) -> str | None:
    """After a 412, the ETag of ``key`` if it holds exactly ``body``, else None.

    botocore retries a PUT whose response was lost; when the first attempt had landed, the
    retry meets its own write and gets 412. Our documents carry our run id and timestamps,
    so byte-equal content is our write, not another writer's."""
    stored = store.get(key)
    return stored.etag if stored is not None and stored.body == body else None


@dataclass(frozen=True)
class Checkpoint:
    watermark: datetime | None = None
    seen: dict[str, int] = field(default_factory=dict)
    etag: str | None = None  # of the stored object this was read from; None: there is none
    document: dict[str, Any] = field(default_factory=dict)


def unreadable(what: str, key: str, body: bytes, why: str, todo: str) -> UnreadableState:
    """The error for a state object that is not what poller wrote: its key, why, what to do.
    Never guessed around: starting over could re-read a year, or run beside another writer."""
    if looks_like_chunk_framing(body):
        why += (
            "; it starts with aws-chunked framing: the store kept boto3's upload encoding as"
            " the body (set s3.checksums=false, see README, S3-compatible stores)"
        )
    return UnreadableState(f"the {what} {key} is unreadable ({why}); nothing was changed. {todo}")


def _document(body: bytes, version: int) -> tuple[dict[str, Any] | None, str]:
    """The JSON object of a state document of ``version``, or None and why not."""
    try:
        document = json.loads(body)
    except ValueError:
        return None, "not JSON"
    if not isinstance(document, dict):
        return None, "not a JSON object"
    found = document.get("version")
    if found != version:
        newer = isinstance(found, int) and found > version
        hint = " (written by a newer poller?)" if newer else ""
        return None, f"version {found!r}, this poller reads version {version}{hint}"
    return document, ""


def _parse_checkpoint(stored: StoredObject, key: str) -> Checkpoint:
    todo = (
        "Inspect it (aws s3 cp s3://BUCKET/KEY -); restore a good version if the bucket keeps"
        " versions, or delete it to restart from sync.first_run_since (verify --repair then"
        " fills any gap)"
    )
    document, why = _document(stored.body, CHECKPOINT_VERSION)
    if document is None:
        raise unreadable("checkpoint", key, stored.body, why, todo)
    try:
        watermark_text = document.get("watermark")
        watermark = (
            datetime.fromisoformat(watermark_text.replace("Z", "+00:00")).astimezone(UTC)
            if watermark_text
            else None
        )
        seen = {str(k): int(v) for k, v in (document.get("seen") or {}).items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        why = f"a field does not read: {type(exc).__name__}"
        raise unreadable("checkpoint", key, stored.body, why, todo) from exc
    return Checkpoint(watermark, seen, stored.etag, document)


class CheckpointStore:
    def __init__(self, store: ObjectStore, layout: Layout) -> None:
        self._store = store
        self._key = layout.checkpoint_key

    def load(self) -> Checkpoint:
        stored = self._store.get(self._key)
        return Checkpoint() if stored is None else _parse_checkpoint(stored, self._key)

    def commit(
        self,
        previous: Checkpoint,
        watermark: datetime,
        seen: dict[str, int],
        run_id: str,
        mode: str,
        now: datetime,
        statuses: tuple[str, ...] = (),
        counts: dict[str, int] | None = None,
    ) -> Checkpoint:
        """Replace ``previous`` if and only if it is still what is stored; never go backwards."""
        if previous.watermark is not None and watermark < previous.watermark:
            watermark = previous.watermark
        document = {
            "version": CHECKPOINT_VERSION,
            "watermark": iso_z(watermark),
            "seen": seen,
            "updated_at": iso_z(now),
            "updated_by": run_id,
            "mode": mode,
            "statuses": sorted(statuses),
        }
        if counts is not None:
            document["run"] = dict(counts)  # the committing run's counts so far (for status)
        body = json.dumps(document, sort_keys=True).encode("utf-8")
        etag: str | None
        try:
            if previous.etag is None:
                etag = self._store.put(self._key, body, if_none_match=True)
            else:
                etag = self._store.put(self._key, body, if_match=previous.etag)
        except PreconditionFailed as exc:
            etag = our_write_landed(self._store, self._key, body)
            if etag is None:
                raise CheckpointConflict(
                    f"the checkpoint {self._key} changed while this run worked: another"
                    " writer moved it, so this run leaves it alone"
                ) from exc
        return Checkpoint(watermark, seen, etag, document)


# What a record written before records named their statuses covered. Such a record
# (``<from>_<until>``, no statuses in the key or the body) says only that backfill finished
# the span with the statuses it was configured for, and those are not known now; it is read
# as covering what the default covered then, ``active`` and ``dismissed``, the one reading
# that does not make every old range be listed again. A run of an older version made with
# ``threatstack.statuses: [active]`` is therefore not re-read by itself: run that range's
# backfill once more after deleting its old records (README, *Catch up and audit*).
LEGACY_CHUNK_STATUSES = frozenset({"active", "dismissed"})


@dataclass(frozen=True)
class ChunkRecord:
    since: datetime
    until: datetime
    statuses: frozenset[str]
    key: str = ""
    written: datetime | None = None  # Last-Modified: when finished, or its dismissals swept


class ChunkRecords:
    """Finished backfill chunks, one small object each under ``P/_poller/backfill/``. The key
    names the span and the alert lists read over it
    (``20261101T000000Z_20261102T000000Z_active_dismissed``), so one listing tells what is
    done; the body says who finished it, what it read itself and with what counts. Records
    only ever widen coverage: a span is covered for a status when one record's span holds
    it and names the status."""

    def __init__(self, store: ObjectStore, layout: Layout) -> None:
        self._store = store
        self._layout = layout
        self._records: list[ChunkRecord] = []

    def load(self) -> ChunkRecords:
        self._records = []
        prefix = self._layout.backfill_prefix
        for item in self._store.iter_objects(prefix):
            key = item.key
            since_text, _, rest = key[len(prefix) :].partition("_")
            until_text, _, named = rest.partition("_")
            statuses = [status for status in named.split("_") if status]
            try:
                since, until = parse_compact(since_text), parse_compact(until_text)
            except ValueError:
                log.warning("backfill.record_ignored", extra={"fields": {"key": key}})
                continue
            covered = frozenset(statuses) if statuses else LEGACY_CHUNK_STATUSES
            self._records.append(ChunkRecord(since, until, covered, key, item.last_modified))
        return self

    def last_written(self, since: datetime, until: datetime) -> ChunkRecord | None:
        """Of the records holding [since, until), the one written last (None: none)."""
        holding = [r for r in self._records if r.since <= since and until <= r.until]
        return max(
            holding, key=lambda r: r.written or datetime.min.replace(tzinfo=UTC), default=None
        )

    def swept(self, record: ChunkRecord, at: datetime) -> None:
        """Its dismissed list was read again at ``at`` (``dismissals_swept_at`` in its body;
        its Last-Modified moves, which is what ``last_written`` compares)."""
        found = self._store.get(record.key)
        try:
            document = json.loads(found.body) if found is not None else {}
        except ValueError:
            document = {}
        document = document if isinstance(document, dict) else {}
        document["dismissals_swept_at"] = iso_z(at)
        self._store.put(record.key, json.dumps(document, sort_keys=True).encode("utf-8"))

    def covered(self, since: datetime, until: datetime) -> frozenset[str]:
        """The statuses some finished chunk read over the whole of [since, until)."""
        found: set[str] = set()
        for record in self._records:
            if record.since <= since and until <= record.until:
                found |= record.statuses
        return frozenset(found)

    def record(
        self, since: datetime, until: datetime, statuses: Iterable[str], document: dict[str, Any]
    ) -> None:
        """[since, until) is finished for ``statuses``: what earlier records covered and
        what this run read."""
        covered = frozenset(statuses)
        body = json.dumps(
            {"from": iso_z(since), "until": iso_z(until), "statuses": sorted(covered), **document},
            sort_keys=True,
        ).encode("utf-8")
        self._store.put(self._layout.backfill_key(since, until, covered), body)
        self._records.append(ChunkRecord(since, until, covered))


@dataclass(frozen=True)
class Owed:
    """What is known of one owed full record: since when, and how asking went."""

    alert_id: str
    since: datetime
    attempts: int = 0
    last_error: str = ""
    webhook_key: str = ""  # the key the push wrote ("" when unknown)


class PendingRecords:
    """Ids whose full record is owed, one object each under ``P/_poller/pending/``.

    The object is ``{"webhook_key": K}`` when the push path marks it (owed since its
    Last-Modified; K is the webhook key the push wrote, so a re-send in another minute names
    no second key), and ``{"owed_since": ..., "attempts": n, "last_error": ..., "webhook_key":
    K}`` once a fetch failed. Marks of older versions are ``{}``. An id
    given up on moves to ``P/_poller/unfetchable/<id>`` with the reason (``status`` shows
    those): a 404 past the grace period is an answer, and so are too many failed fetches."""

    def __init__(self, store: ObjectStore, layout: Layout) -> None:
        self._store = store
        self._prefix = layout.key("_poller", "pending") + "/"
        self._gone = layout.key("_poller", "unfetchable") + "/"

    def add(self, alert_id: str, webhook_key: str) -> str | None:
        """Mark ``alert_id`` owed, naming the webhook key its push writes. Returns None when
        the mark is new, else the key an earlier push named ("" when the mark names none:
        written by an older version)."""
        marker = json.dumps({"webhook_key": webhook_key}).encode()
        try:
            self._store.put(self._prefix + alert_id, marker, if_none_match=True)
        except PreconditionFailed:
            return self._webhook_key(alert_id)
        return None

    def name_webhook_key(self, alert_id: str, webhook_key: str) -> None:
        """Point an existing mark at the webhook key actually written (its attempts kept)."""
        found = self._store.get(self._prefix + alert_id)
        document = _object_or_empty(found.body if found is not None else b"{}")
        if found is not None:  # the rewrite moves Last-Modified: keep when it became owed
            document.setdefault("owed_since", iso_z(found.last_modified))
        document["webhook_key"] = webhook_key
        self._store.put(self._prefix + alert_id, json.dumps(document).encode())

    def _webhook_key(self, alert_id: str) -> str:
        found = self._store.get(self._prefix + alert_id)
        if found is None:  # dropped in between: its full record is written
            return ""
        key = _object_or_empty(found.body).get("webhook_key")
        return key if isinstance(key, str) else ""

    def done(self, alert_id: str) -> None:
        self._store.delete(self._prefix + alert_id)

    def ids(self) -> list[str]:
        return [key[len(self._prefix) :] for key in self._store.list_keys(self._prefix)]

    def owed(self, alert_id: str) -> Owed | None:
        found = self._store.get(self._prefix + alert_id)
        if found is None:
            return None
        document = _object_or_empty(found.body)
        since = found.last_modified
        with contextlib.suppress(KeyError, TypeError, ValueError):
            since = datetime.fromisoformat(str(document["owed_since"]))
        return Owed(
            alert_id,
            since,
            int(document.get("attempts", 0) or 0),
            str(document.get("last_error", "")),
            str(document.get("webhook_key", "") or ""),
        )

    def failed(self, owed: Owed, error: str) -> None:
        """Count a failed fetch (the next cycle tries again)."""
        document = {
            "owed_since": iso_z(owed.since),
            "attempts": owed.attempts + 1,
            "last_error": error[:300],
        }
        if owed.webhook_key:
            document["webhook_key"] = owed.webhook_key
        self._store.put(self._prefix + owed.alert_id, json.dumps(document).encode())

    def give_up(self, owed: Owed, reason: str, now: datetime) -> None:
        """Stop asking: record why under ``unfetchable/``, then drop the pending mark."""
        document = {
            "id": owed.alert_id,
            "reason": reason,
            "owed_since": iso_z(owed.since),
            "attempts": owed.attempts + 1,
            "given_up_at": iso_z(now),
        }
        self._store.put(self._gone + owed.alert_id, json.dumps(document).encode())
        self.done(owed.alert_id)

    def unfetchable(self) -> list[str]:
        return [key[len(self._gone) :] for key in self._store.list_keys(self._gone)]


@dataclass(frozen=True)
class LeaseInfo:
    """What ``poller status`` shows about the lease."""

    document: dict[str, Any]
    age_seconds: float
    stale: bool
    problem: str = ""  # why the stored lease is unreadable; "" when it reads

    @property
    def released(self) -> bool:
        return self.document.get("released") is True

    @property
    def free(self) -> bool:
        return self.released or self.stale


class Lease:
    """A lease on the prefix, taken with a create-only write and renewed under its ETag."""

    def __init__(
        self,
        store: ObjectStore,
        layout: Layout,
        ttl_seconds: int,
        holder: dict[str, Any],
        clock: Clock,
        recent_requests: Callable[[], list[float]] = list,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._key = layout.lease_key
        self._ttl = ttl_seconds
        self._holder = dict(holder)
        self._clock = clock
        self._etag: str | None = None
        self._acquired_at: datetime | None = None
        self._lock = threading.Lock()
        self._recent_requests = recent_requests
        self._monotonic = monotonic
        self._token = ""  # this holding's, new at every acquire
        # When the write that made the stored lease ours was sent (monotonic): the lease
        # cannot have gone stale, by S3's clock, less than the ttl after it.
        self._confirmed_at: float | None = None
        # Request start times (epoch) the previous holder recorded, for the request budget.
        self.inherited_requests: list[float] = []

    @property
    def held(self) -> bool:
        return self._etag is not None

    def _body(self, released: bool = False) -> bytes:
        now = self._clock()
        document: dict[str, Any] = {
            "version": LEASE_VERSION,
            **self._holder,
            "token": self._token,
            "acquired_at": iso_z(self._acquired_at or now),
            "renewed_at": iso_z(now),
            "ttl_seconds": self._ttl,
            "expires_at": iso_z(now + timedelta(seconds=self._ttl)),
            "recent_requests": self._recent_requests(),
        }
        if released:
            document["released"] = True
        return json.dumps(document, sort_keys=True).encode("utf-8")

    def inspect(self) -> LeaseInfo | None:
        stored = self._store.get(self._key)
        return None if stored is None else self._info(stored)

    def _info(self, stored: StoredObject) -> LeaseInfo:
        age = (stored.server_time - stored.last_modified).total_seconds()
        document, why = _document(stored.body, LEASE_VERSION)
        if document is not None and not document.get("run_id"):
            document, why = None, "no run_id"
        if document is None:
            return LeaseInfo({}, age, age > self._ttl, why)
        return LeaseInfo(document, age, age > self._ttl)

    def _refuse_unreadable(self, stored: StoredObject, info: LeaseInfo) -> None:
        if info.problem:
            raise unreadable(
                "lease",
                self._key,
                stored.body,
                info.problem,
                "If no poller is running on this prefix, inspect it and delete it; the next"
                " run takes a new lease.",
            )

    def acquire(self) -> None:
        """Take the lease, or take over a stale one; raise LeaseHeld when another holds it."""
        # Read first, write once: the common case (a released lease) costs a GET and one
        # conditional PUT, and nothing is written before the lease is known to be free.
        for _ in range(3):  # the lease may appear or vanish between our read and our write
            self._acquired_at = self._clock()
            self._token = uuid.uuid4().hex
            self._confirmed_at = self._monotonic()  # before the write that may make it ours
            stored = self._store.get(self._key)
            if stored is None:
                body = self._body()
                try:
                    self._etag = self._store.put(self._key, body, if_none_match=True)
                    return
                except PreconditionFailed:
                    # Another run created it first, or our own write's response was lost.
                    self._etag = our_write_landed(self._store, self._key, body)
                    if self._etag is not None:
                        return
                    continue
            info = self._info(stored)
            self._refuse_unreadable(stored, info)
            if not info.free:
                holder = info.document
                raise LeaseHeld(
                    f"another run holds the lease: run {holder.get('run_id')}"
                    f" ({holder.get('mode')}) on {holder.get('host')} pid {holder.get('pid')},"
                    " renewed"
                    f" {info.age_seconds:.0f}s ago (ttl {self._ttl}s)"
                )
            body = self._body()
            try:
                self._etag = self._store.put(self._key, body, if_match=stored.etag)
            except PreconditionFailed:
                self._etag = our_write_landed(self._store, self._key, body)
                if self._etag is None:
                    raise LeaseHeld(
                        "another run holds the lease: it took the free lease first"
                    ) from None
            inherited = info.document.get("recent_requests")
            # The daemon keeps one budget across its cycles: its own times are counted already.
            if isinstance(inherited, list) and info.document.get("run_id") != self._holder.get(
                "run_id"
            ):
                self.inherited_requests = list(inherited)
            if not info.released:
                log.warning(
                    "lease.taken_over",
                    extra={"fields": {"previous": info.document, "age_s": round(info.age_seconds)}},
                )
            return
        raise LeaseHeld("the lease keeps changing hands; giving up this time")

    def renew(self) -> None:
        """Extend the lease; raise LeaseLost when it is no longer ours.

        A renewal that S3 answered with an error or never answered (ArchiveUnavailable,
        after botocore's retries) may have landed: the lease is read back, and while it
        still carries this holding's token it is ours, so the run carries on. When even the
        read fails, the renewal's error is raised and the lease is still held: the caller
        retries (see ``confirm``)."""
        with self._lock:
            # Twice at most: a 412 that meets our own earlier write (one that landed
            # unanswered) is renewed again on that write's ETag.
            for _ in range(2):
                if self._etag is None:
                    raise LeaseLost("this run does not hold the lease")
                sent = self._monotonic()
                body = self._body()
                try:
                    self._etag = self._store.put(self._key, body, if_match=self._etag)
                except PreconditionFailed as exc:
                    # botocore's retry of a write that landed, or another run's write.
                    landed = self._still_ours(body, sent, exc)
                    if landed:
                        return
                    continue
                except ArchiveUnavailable as exc:
                    try:
                        self._still_ours(body, sent, exc)
                    except ArchiveUnavailable:
                        raise exc from None
                    log.info("lease.renewal_settled", extra={"fields": {"error": str(exc)}})
                    return
                self._confirmed_at = sent
                return

    def _still_ours(self, body: bytes, sent: float, failure: Exception) -> bool:
        """Read the lease back after a renewal whose outcome is unknown (``failure``). Raise
        LeaseLost unless it carries this holding's token and is not released; else take its
        ETag and say whether it is this renewal (``body``, sent at ``sent``) that landed."""
        stored = self._store.get(self._key)
        document = None if stored is None else _document(stored.body, LEASE_VERSION)[0]
        if (
            stored is None
            or document is None
            or document.get("token") != self._token
            or document.get("run_id") != self._holder.get("run_id")
            or document.get("released") is True
        ):
            self._etag = None
            raise LeaseLost(
                "this run's lease was taken over by another run; it stops without writing"
                " the checkpoint"
            ) from failure
        self._etag = stored.etag
        if stored.body != body:
            return False  # ours from an earlier write (landed unanswered), not this one
        self._confirmed_at = sent  # this renewal landed: the lease is fresh from ``sent``
        return True

    def confirm(self) -> None:
        """Between pages: prove, cheaply, that the lease is still ours; raise LeaseLost.

        Costs nothing while the last confirmed renewal (the keeper's, every ttl/3) was sent
        less than ttl/2 ago. Past that (the process was paused, or renewals fail) it renews
        now: a lease taken over meanwhile is found before the next page is written. When
        that renewal fails too and the lease may have gone stale (a ttl since the last
        confirmed one), another run may hold it: LeaseLost."""
        if self._etag is None:
            raise LeaseLost("this run no longer holds the lease")
        confirmed = self._confirmed_at
        if confirmed is not None and self._monotonic() - confirmed < self._ttl / 2:
            return
        try:
            self.renew()
        except ArchiveUnavailable as exc:
            confirmed = self._confirmed_at
            age = self._monotonic() - confirmed if confirmed is not None else float(self._ttl)
            if age >= self._ttl:
                raise LeaseLost(
                    f"this run could not renew its lease for {age:.0f}s (ttl {self._ttl}s):"
                    f" another run may hold it now ({exc}); it stops without writing the"
                    " checkpoint"
                ) from exc
            log.warning("lease.renew_failed", extra={"fields": {"error": str(exc)}})

    def release(self) -> None:
        """Let go: mark the lease released (``If-Match``), keeping this run's recent request
        times for the next holder. The next run may take it at once."""
        with self._lock:
            etag, self._etag = self._etag, None
        if etag is None:
            return
        try:
            try:
                self._store.put(self._key, self._body(released=True), if_match=etag)
            except ConditionalWritesUnsupported:
                # A store without If-Match must not keep the lease held for its ttl: we
                # held it a moment ago, so mark it released plainly.
                self._store.put(self._key, self._body(released=True))
        except PreconditionFailed:
            pass  # someone else holds it now (or our own write's response was lost)
        except Exception as exc:  # noqa: BLE001 - releasing is best effort; the ttl covers it
            log.warning("lease.release_failed", extra={"fields": {"error": str(exc)}})


class LeaseKeeper:
    """Renews a held lease in the background every ttl/3 until stopped or lost."""

    def __init__(self, lease: Lease, ttl_seconds: int) -> None:
        self._lease = lease
        self._interval = max(ttl_seconds / 3.0, 1.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
        self.lost: LeaseLost | None = None

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._lease.renew()
            except LeaseLost as exc:
                self.lost = exc
                log.error("lease.lost", extra={"fields": {"error": str(exc)}})
                return
            except Exception as exc:  # noqa: BLE001 - a failed renewal is retried next tick
                log.warning("lease.renew_failed", extra={"fields": {"error": str(exc)}})


def _object_or_empty(body: bytes) -> dict[str, Any]:
    """A marker's JSON object; {} for anything else (a damaged mark is still a mark)."""
    try:
        document = json.loads(body)
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}
