"""The one place that builds the real things: the boto3 client, the requests session, and
the objects of a run, wired together. Tests build the same objects with fakes instead."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import requests
from botocore.config import Config

from poller.archive.allowance import PrefixAllowance
from poller.archive.manifests import Manifests, closed_through
from poller.archive.probe import StoreProof, fingerprint, prove_store, record_proof, recorded_proof
from poller.archive.reading import archived_webhooks
from poller.archive.records import SAFE_ID, Alert, Layout
from poller.archive.revisits import RevisitStore
from poller.archive.state import CheckpointStore, ChunkRecords, Lease, LeaseKeeper, PendingRecords
from poller.archive.store import ObjectStore, RequestCounter, S3ObjectStore, WriteOptions
from poller.archive.writer import Archive
from poller.config import S3Settings, Settings
from poller.errors import Stopped
from poller.serving.http import PROVISIONAL_STATUS, CachedStatus, PushParts, status_document
from poller.serving.receiver import DETAIL_SHARE, DetailFetcher, Receiver
from poller.tables.build import TablesBuilder, TablesReport
from poller.tables.keys import day_of_webhook_key, may_be_closed
from poller.tables.query import PartCache, default_cache_dir
from poller.threatstack.budget import RequestBudget
from poller.threatstack.client import ThreatStackClient
from poller.threatstack.retrying import RetryPolicy
from poller.timeutil import Clock, utc_now
from poller.walks.revisit import Revisit, RevisitSettings
from poller.walks.sync import (
    PAGES_PER_LISTING,
    Cycle,
    CycleHooks,
    CycleObserver,
    CycleSettings,
    Summary,
    Unobserved,
    owed_fetches,
)
from poller.walks.verify import Verifier

log = logging.getLogger(__name__)

UNGUARDED = (
    "s3.require_conditional_writes=false on a store without conditional writes: the lease is"
    " taken by read-then-write, so two runs starting within the same moment can both work"
    " until the next renewal shows one of them it lost; a record is checked before it is"
    " written, not atomically; two processes taking a grant of the shared request budget in"
    " the same moment can both write it, and the later overwrites the earlier"
)


def interruptible_sleep(stop: threading.Event) -> Callable[[float], None]:
    """A ``sleep`` for backoff and budget waits that a stop request cuts short."""

    def sleep(seconds: float) -> None:
        if stop.wait(seconds):
            raise Stopped()

    return sleep


def longest_request_seconds(settings: Settings) -> float:
    """The longest one API request can take, retries included: its whole retry span, one
    last attempt's deadline, and a full wait for the request budget."""
    ts = settings.threatstack
    return ts.max_retry_seconds + ts.request_deadline_seconds + 61


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def s3_client(settings: S3Settings) -> Any:
    """The only boto3 client. Endpoint, region and credentials come from the standard AWS
    variables (``AWS_ENDPOINT_URL_S3``, ``AWS_REGION``, IRSA...), as boto3 reads them.
    Retries are botocore's ``standard`` mode (throttling, 5xx, timeouts, with backoff),
    chosen here rather than left to the environment.

    ``s3.checksums=false`` sends no checksum at all: botocore (>= 1.36) otherwise adds a CRC32
    to every PutObject, and over HTTPS streams it as ``aws-chunked`` with a trailer, which
    some S3-compatible stores reject or store as the body. ``when_required`` is what
    ``AWS_REQUEST_CHECKSUM_CALCULATION`` would set; the setting makes it one switch."""
    when = {} if settings.checksums else {"request_checksum_calculation": "when_required"}
    validation = {} if settings.checksums else {"response_checksum_validation": "when_required"}
    config = Config(
        retries={"mode": "standard", "max_attempts": settings.max_attempts},
        max_pool_connections=settings.max_concurrency + 2,
        connect_timeout=10,
        read_timeout=60,
        **when,
        **validation,
    )
    return boto3.session.Session().client("s3", config=config)


def write_options(s3: S3Settings) -> WriteOptions:
    return WriteOptions(
        checksums=s3.checksums,
        sse=s3.sse,
        kms_key_id=s3.kms_key_id,
        storage_class=s3.storage_class,
        object_lock_mode=s3.object_lock_mode,
        object_lock_days=s3.object_lock_days,
    )


def local_s3_client(endpoint_url: str) -> Any:
    """A client for a local S3 server (the demo's), with throwaway credentials."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="demo",
        aws_secret_access_key="demo",  # noqa: S106 - a local server's dummy credentials
    )


@dataclass(frozen=True)
class RequestCount:
    """The one count of a process's requests, retries included: the API side's budget
    counts every Threat Stack attempt, the S3 client's send hook every S3 request."""

    budget: RequestBudget
    s3_sent: Callable[[], int]

    @contextmanager
    def measure(self, summary: Summary) -> Iterator[None]:
        """Fill ``summary``'s request counts and duration with what the block spends, even
        when it raises (deltas: the daemon reuses its clients from cycle to cycle)."""
        started = time.monotonic()
        api_before, s3_before = self.budget.sent, self.s3_sent()
        try:
            yield
        finally:
            summary.api_requests = self.budget.sent - api_before
            summary.s3_requests = self.s3_sent() - s3_before
            summary.duration_s = round(time.monotonic() - started, 3)


@dataclass
class Runtime:
    settings: Settings
    run_id: str
    mode: str
    clock: Clock
    api: ThreatStackClient
    budget: RequestBudget
    store: ObjectStore
    requests: RequestCount
    layout: Layout
    stop: threading.Event
    # The store sending the conditional headers whatever s3.require_conditional_writes
    # says: the probe asks the store itself what it does.
    native_store: ObjectStore | None = None
    proof: StoreProof | None = None
    # The prefix's request ledger (None: not shared, e.g. a test's runtime).
    allowance: PrefixAllowance | None = None
    manifested_through: date | None = None

    def probe(self, fresh: bool = False) -> StoreProof:
        """What the store does (see poller.archive.probe): a recorded proof when one under a
        day old matches (unless ``fresh``), else the probe, recorded when it passes."""
        s3 = self.settings.s3
        print_ = self.fingerprint()
        proof = None if fresh else recorded_proof(self.store, self.layout, print_)
        if proof is None:
            native = self.native_store or self.store
            proof = prove_store(native, self.layout, self.run_id, s3.checksums)
            if proof.refusal(s3.require_conditional_writes) is None:
                record_proof(self.store, self.layout, print_, proof, self.run_id, self.clock())
        return proof

    def fingerprint(self) -> str:
        """What a recorded proof must match (see poller.archive.probe.fingerprint)."""
        s3 = self.settings.s3
        endpoint = str(getattr(self.store, "endpoint", ""))
        return fingerprint(write_options(s3), s3.require_conditional_writes, endpoint)

    def prove_store(self) -> StoreProof:
        """Once per process, before the first write of every command that writes: raise
        StoreUnfit or UnguardedStore (with the setting that works around it) when nothing
        may be archived on this store as configured."""
        if self.proof is None:
            proof = self.probe()
            refusal = proof.refusal(self.settings.s3.require_conditional_writes)
            if refusal is not None:
                raise refusal
            if proof.conditional_writes and isinstance(self.store, S3ObjectStore):
                self.store.conditional_writes = True  # the store has them: use them
            if not proof.conditional_writes:
                log.warning(
                    "store.unguarded",
                    extra={"fields": {"lost": UNGUARDED, "findings": proof.as_dict()}},
                )
            self.proof = proof
        return self.proof

    def close_days(self, summary: Summary) -> None:
        """After a cycle: the manifest of every closed UTC day not written yet (see
        poller.archive.manifests). One listing a run; a daemon lists once a day."""
        if not summary.watermark:
            return
        watermark = datetime.fromisoformat(summary.watermark.replace("Z", "+00:00"))
        through = closed_through(watermark, timedelta(seconds=self.settings.sync.lookback_seconds))
        if self.manifested_through is not None and through <= self.manifested_through:
            return
        manifests = Manifests(self.store, self.layout, self.settings.s3.max_concurrency)
        written = manifests.close_days(through, self.run_id, self.clock())
        if written:
            days = [day.isoformat() for day in written]
            log.info("manifests.written", extra={"fields": {"days": days}})
        self.manifested_through = through

    # Creation days this process archived into (see Archive.touched).
    touched_days: set[date] = field(default_factory=set)
    # Days a backfill or a repair marked due before its first write into them.
    marked_ahead: set[date] = field(default_factory=set)
    _mark_lock: threading.Lock = field(default_factory=threading.Lock)

    def archive(self) -> Archive:
        marking = self.mode in ("backfill", "verify")
        return Archive(
            self.store,
            self.layout,
            self.settings.threatstack.org_id,
            self.touched_days,
            self.mark_due_ahead if marking else None,
            self.mark_due_again if marking else None,
        )

    def mark_due_again(self, days: set[date]) -> None:
        """``Archive.settle``: the days a chunk (or a verified day) wrote into, marked due
        after its writes and before its commit."""
        builder = self.tables_builder()
        for day in sorted(days):
            builder.mark_due(day, f"archived into by {self.mode}")

    def mark_due_ahead(self, day: date) -> None:
        """Before a backfill's or a repair's first write into ``day``: its due marker, so a
        kill after the write (whose rerun meets a 412 and archives nothing) still leaves the
        day to be tabled again. ``mark_tables_due`` marks it again at the end, after the
        last write (a new ETag: a pass that listed the day meanwhile leaves it due)."""
        with self._mark_lock:  # the writers are threads: one marker before any write
            if day not in self.marked_ahead:
                self.tables_builder().mark_due(day, f"being archived into by {self.mode}")
                self.marked_ahead.add(day)

    def give_back(self) -> None:
        """At a clean exit and a cycle's end: the slots of the prefix's budget this process
        took and did not use count for the others again (see poller.archive.allowance)."""
        if self.allowance is not None:
            self.allowance.give_back()

    def lease(self) -> Lease:
        holder = {
            "run_id": self.run_id,
            "mode": self.mode,
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        return Lease(
            self.store,
            self.layout,
            self.settings.sync.lease_ttl_seconds,
            holder,
            self.clock,
            recent_requests=self.budget.recent,
        )

    def verifier(self, observer: CycleObserver | None = None) -> Verifier:
        return Verifier(
            self.api,
            self.store,
            self.archive(),
            self.settings.threatstack.statuses,
            self.clock,
            observer,
        )

    def pending(self) -> PendingRecords:
        return PendingRecords(self.store, self.layout)

    def receiver(self, with_detail_fetch: bool = True) -> Receiver:
        """The push path's receiver; its detail fetches share this process's budget and
        take only what the polling cycle leaves (under half of the budget in 60 s)."""
        pending = self.pending()
        archive = self.archive()
        budget = self.budget

        def headroom() -> bool:
            return len(budget.recent()) < budget.per_minute * DETAIL_SHARE

        def write_full(alert: Alert) -> bool:
            return archive.store_full(alert)

        fetcher = (
            DetailFetcher(self.api.get_alert, write_full, pending, headroom, self.stop).start()
            if with_detail_fetch
            else None
        )
        builder = self.tables_builder()
        lookback = timedelta(seconds=self.settings.sync.lookback_seconds)

        def mark_late_days(webhook_keys: set[str]) -> None:
            # A push is late when the day its webhook record is filed under may already have
            # its parts (a relayed webhook retried for hours, an alert the API does not list):
            # that day is due again (the receiver asks before and after a batch's writes).
            days = {day_of_webhook_key(builder.keys, key) for key in webhook_keys}
            for day in sorted(d for d in days if d is not None):
                if may_be_closed(day, self.clock(), lookback):
                    builder.mark_due(day, "archived into by a late push")

        return Receiver(
            self.store, self.layout, self.settings.threatstack.org_id, fetcher, mark_late_days
        )

    def push_parts(self) -> PushParts | None:
        """What the push routes work with; None while ``receiver.token`` is unset."""
        settings = self.settings.receiver
        if not settings.token:
            return None
        layout, store = self.layout, self.store

        def read_object(alert_id: str) -> Any:
            if not SAFE_ID.fullmatch(alert_id):
                return None
            found = store.get(layout.alert_key(alert_id))
            return None if found is None else json.loads(found.body)

        def list_webhooks(start: datetime, end: datetime, limit: int) -> list[Any]:
            return archived_webhooks(store, layout, start, end, limit)

        def bucket_reachable() -> bool:
            store.get(layout.checkpoint_key)  # raises when the bucket cannot be read
            return True

        def api_reachable() -> bool:
            self.api.self_test()  # raises when the credentials or the API fail
            return True

        def confirm_subscription(url: str) -> None:
            # Only for an https SNS host and an allowed topic (checked by the caller); no
            # redirect is followed, so the check is about the host that is really asked.
            requests.get(url, timeout=10, allow_redirects=False).raise_for_status()

        return PushParts(
            settings=settings,
            organization_id=self.settings.threatstack.org_id,
            receiver=self.receiver(),
            read_object=read_object,
            list_webhooks=list_webhooks,
            status=CachedStatus(
                lambda: status_document(bucket_reachable, api_reachable),
                provisional=PROVISIONAL_STATUS,
            ),
            confirm_subscription=confirm_subscription,
        )

    def tables_builder(self) -> TablesBuilder:
        settings = self.settings
        return TablesBuilder(
            self.store,
            self.layout,
            lookback=timedelta(seconds=settings.sync.lookback_seconds),
            batch_size=settings.tables.batch_size,
            concurrency=settings.s3.max_concurrency,
            should_stop=self.stop.is_set,
        )

    def watermark(self) -> datetime | None:
        return CheckpointStore(self.store, self.layout).load().watermark

    def tables_pass(
        self,
        since: date | None = None,
        until: date | None = None,
        deadline: float | None = None,
    ) -> TablesReport:
        """One pass of ``poller tables`` (see poller.tables.build); no lease: parts are
        create-only and a lost race re-reads what the winner wrote."""
        before = self.requests.s3_sent()
        report = TablesReport()
        try:
            builder = self.tables_builder()
            plan = builder.plan(self.watermark(), since, until)
            return builder.run(plan, deadline, report)
        finally:
            report.s3_requests = self.requests.s3_sent() - before

    def mark_tables_due(self) -> int:
        """Days a backfill or a repair archived into are built again (a new part holds what
        their parts lack). Returns how many days were marked."""
        touched = sorted(self.touched_days)
        builder = self.tables_builder()
        for day in touched:
            builder.mark_due(day, f"archived into by {self.mode}")
        return len(touched)

    def part_cache(self) -> PartCache:
        folder = self.settings.tables.cache_dir
        path = (
            Path(folder).expanduser()
            if folder
            else default_cache_dir(self.settings.s3.bucket, self.settings.s3.prefix)
        )
        return PartCache(self.store, self.layout, path)

    def chunk_records(self) -> ChunkRecords:
        return ChunkRecords(self.store, self.layout)

    def revisit(self) -> Revisit:
        """The revisit of later dismissals; its list requests share this process's budget,
        and it yields after a minute's worth of them per cycle (new alerts first)."""
        sync = self.settings.sync
        return Revisit(
            self.api,
            Archive(self.store, self.layout, self.settings.threatstack.org_id),
            RevisitStore(self.store, self.layout),
            RevisitSettings(
                days=sync.revisit_days,
                interval=timedelta(seconds=sync.revisit_interval_seconds),
                max_concurrency=self.settings.s3.max_concurrency,
                pages_per_cycle=self.settings.threatstack.requests_per_minute,
            ),
            self.clock,
            self.run_id,
        )

    def cycle(self, lease: Lease, hooks: CycleHooks) -> Cycle:
        settings = self.settings
        return Cycle(
            source=self.api,
            archive=self.archive(),
            checkpoints=CheckpointStore(self.store, self.layout),
            lease=lease,
            settings=CycleSettings(
                statuses=settings.threatstack.statuses,
                lookback=timedelta(seconds=settings.sync.lookback_seconds),
                settle=timedelta(seconds=settings.sync.settle_seconds),
                first_run_since=settings.sync.first_run_since,
                max_concurrency=settings.s3.max_concurrency,
                max_window=timedelta(seconds=settings.sync.max_window_seconds),
                max_cycle=timedelta(seconds=settings.sync.max_cycle_seconds)
                if settings.sync.max_cycle_seconds
                else None,
                seconds_per_listing=PAGES_PER_LISTING
                * 60
                / settings.threatstack.requests_per_minute,
                deadline_floor_seconds=longest_request_seconds(settings),
                owed_fetches=owed_fetches(settings.threatstack.requests_per_minute),
            ),
            clock=self.clock,
            run_id=self.run_id,
            mode=self.mode,
            hooks=hooks,
            pending=self.pending(),
            revisit=self.revisit(),
        )


def build(
    settings: Settings,
    mode: str,
    *,
    clock: Clock = utc_now,
    sleep: Callable[[float], None] = time.sleep,
    session: requests.Session | None = None,
    s3: Any = None,
    run_id: str | None = None,
    stop: threading.Event | None = None,
) -> Runtime:
    ts = settings.threatstack
    stop = stop or threading.Event()
    if sleep is time.sleep:
        sleep = interruptible_sleep(stop)
    run_id = run_id or new_run_id()
    counter = RequestCounter()
    client = counter.attach(s3 if s3 is not None else s3_client(settings.s3))

    def renew_client() -> Any:
        # A fresh session re-reads what may have changed under a long-lived process:
        # rotated key files, a new web identity token (IRSA), a new profile.
        return counter.attach(s3_client(settings.s3))

    store = S3ObjectStore(
        client,
        settings.s3.bucket,
        write_options(settings.s3),
        clock,
        conditional_writes=settings.s3.require_conditional_writes,
        renew_client=renew_client if s3 is None else None,
    )
    layout = Layout(settings.s3.prefix)
    # The budget is the prefix's (SPEC, A good API citizen): every process on this bucket
    # and prefix takes its requests from one ledger in the bucket, reached through the
    # API side's SharedAllowance protocol.
    # The ledger is a write: the store is proven first (late-bound: the Runtime proves it).
    built: list[Runtime] = []
    allowance = PrefixAllowance(
        store,
        layout,
        ts.requests_per_minute,
        run_id,
        sleep=sleep,
        before_first_write=lambda: built[0].prove_store(),
    )
    budget = RequestBudget(ts.requests_per_minute, sleep=sleep, shared=allowance)
    api = ThreatStackClient(
        ts,
        session or requests.Session(),
        budget,
        RetryPolicy(max_attempts=ts.max_attempts, max_delay_seconds=ts.max_retry_seconds),
        sleep,
    )
    runtime = Runtime(
        settings=settings,
        run_id=run_id,
        mode=mode,
        clock=clock,
        api=api,
        budget=budget,
        store=store,
        requests=RequestCount(budget, counter),
        layout=layout,
        stop=stop,
        native_store=store.natively(),
        allowance=allowance,
    )
    built.append(runtime)
    return runtime


# A walk other than sync's over a cycle's parts, such as a backfill.
Walk = Callable[[Runtime, Cycle, Summary], None]


def run_cycle(
    runtime: Runtime,
    summary: Summary,
    observer: CycleObserver | None = None,
    walk: Walk | None = None,
) -> Summary:
    """Take the lease, run one cycle (or ``walk``, e.g. a backfill, on the cycle's parts)
    while keeping it renewed, release it. Raises LeaseHeld (exit 75) when another run holds
    it. ``observer`` is told of every page and commit. The summary's request counts and
    duration cover the whole run, the lease's requests included."""
    lease = runtime.lease()
    with runtime.requests.measure(summary):
        try:
            runtime.prove_store()  # before the first write (the lease), once per process
            lease.acquire()
            # The budget holds across processes taking turns: count the last holder's requests.
            runtime.budget.inherit(lease.inherited_requests)
            with LeaseKeeper(lease, runtime.settings.sync.lease_ttl_seconds) as keeper:
                hooks = CycleHooks(
                    lease_lost=lambda: keeper.lost,
                    should_stop=runtime.stop.is_set,
                    observer=observer or Unobserved(),
                )
                cycle = runtime.cycle(lease, hooks)
                if walk is None:
                    cycle.run(summary)
                    runtime.close_days(summary)
                else:
                    walk(runtime, cycle, summary)
        finally:
            try:
                lease.release()
            finally:
                runtime.give_back()
    return summary
