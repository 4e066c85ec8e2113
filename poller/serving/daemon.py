"""The daemon: a ``sync`` cycle every ``sync.interval_seconds``, health and metrics over
HTTP, and a graceful stop on SIGTERM/SIGINT.

Cadence and liveness are measured on the monotonic clock, never the wall clock: the wall
clock steps (NTP corrections, a VM resumed, a manual fix), and a scheduler that waits for a
wall-clock instant (APScheduler 3's interval trigger, used here before) stalls for an hour
when the clock steps back an hour. The loop waits on the stop event, which cuts the wait
short on SIGTERM; a signal also stops the cycle between pages, releasing the lease. The wall
clock is only shown (``last_progress``, metrics' timestamps).

Liveness is real progress: a page read, a chunk committed, a cycle that ended well or found
another writer. Failed cycles that committed nothing are not progress: FAILURES_BEFORE_RED of
them in a row turn ``/healthz`` red with the last error, so the orchestrator restarts it.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from datetime import date, datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry

from poller.app import Runtime, longest_request_seconds, run_cycle
from poller.archive.failures import CycleRecord, FailureRecord
from poller.config import ReceiverSettings
from poller.errors import LeaseHeld, PollerError, Stopped
from poller.serving.http import Health, build_app
from poller.serving.metrics import Metrics
from poller.serving.server import Limits, Listener
from poller.tables.keys import last_closed_day
from poller.timeutil import Clock, iso_z
from poller.walks.sync import Summary

log = logging.getLogger(__name__)

# Failed (or crashed) cycles in a row before /healthz turns red.
FAILURES_BEFORE_RED = 5


class Daemon:
    def __init__(
        self,
        runtime: Runtime,
        clock: Clock,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runtime = runtime
        self.clock = clock  # the wall clock: shown, never measured with
        self.monotonic = monotonic
        self.metrics = Metrics()
        self.interval = runtime.settings.sync.interval_seconds
        self.last_outcome: str | None = None
        self.last_success: datetime | None = None
        self.last_error: str | None = None
        self.failures_in_a_row = 0
        self._inherited_record = True  # daemon.json may hold an earlier process's count
        self._failure_record = FailureRecord(runtime.store, runtime.layout)
        # Liveness: something must happen (a page read, a chunk committed, a cycle ended)
        # at least this often, or /healthz fails and Kubernetes restarts the pod.
        self.stall_after = timedelta(
            seconds=self.interval + longest_request_seconds(runtime.settings) + 60
        )
        self.last_progress = clock()
        self._progress_at = monotonic()
        self._success_at: float | None = None
        self._cycle_lock = threading.Lock()
        self.http_port: int | None = None  # the port actually bound (http.port may be 0)
        self.push_port: int | None = None  # receiver.port's, when the push path has its own
        # The query tables: built after a cycle when a day has closed since the last pass,
        # when the last pass ran out of time, or hourly (days a backfill marked due).
        self._tables_through: date | None = None
        self._tables_checked: float | None = None  # monotonic
        self._tables_more = False

    def _progressed(self) -> None:
        self.last_progress = self.clock()
        self._progress_at = self.monotonic()

    # ------------------------------------------------------------------ one cycle
    def cycle(self) -> None:
        """One sync cycle; never raises (the next interval is the retry)."""
        with self._cycle_lock:
            if self.runtime.stop.is_set():
                return
            summary = Summary(mode="run", run_id=self.runtime.run_id)
            outcome = "ok"
            try:
                run_cycle(self.runtime, summary, self)
                log.info("cycle.done", extra={"fields": summary.as_dict()})
            except LeaseHeld as exc:
                outcome = "lease_held"  # another writer works; we are a healthy standby
                log.info("cycle.skipped", extra={"fields": {"reason": str(exc)}})
            except PollerError as exc:
                outcome = "failed"
                summary.ok, summary.error = False, str(exc)
                log.error("cycle.failed", extra={"fields": {"error": str(exc)}})
            except Stopped:
                outcome = "stopped"
                log.warning("cycle.stopped")
            except Exception:  # a bug must not kill the daemon; it is logged and counted
                outcome = "crashed"
                log.exception("cycle.crashed")
            now = self.clock()
            self.last_outcome = outcome
            failed_before = self.failures_in_a_row
            if outcome in ("ok", "lease_held"):
                self._progressed()
                self.last_success = now
                self._success_at = self.monotonic()
                self.failures_in_a_row = 0
                self.last_error = None
            elif outcome in ("failed", "crashed"):
                self.last_error = summary.error or "the cycle crashed (see the log)"
                if 0 < summary.chunks_done < summary.chunks_total:
                    # It committed chunks of a walk it could not finish (a catch-up at its
                    # deadline): the watermark moved, which is progress. A failure with
                    # nothing committed, or after the whole walk (the revisit, say, on an
                    # unreadable revisit.json), cycle after cycle, must still turn
                    # /healthz red.
                    self.failures_in_a_row = 0
                else:
                    self.failures_in_a_row += 1
            if self.failures_in_a_row != failed_before:
                self._record(outcome, now)
            elif self._inherited_record and outcome in ("ok", "lease_held"):
                # A daemon restarted for its red /healthz starts at 0: the record its
                # predecessor left still says red. One GET, at the first good cycle only.
                try:
                    left = self._failure_record.read()
                except PollerError as exc:  # best effort, as the record itself
                    log.warning("daemon.record_unread", extra={"fields": {"error": str(exc)}})
                    left = None
                if left is not None and left.get("failed_cycles_in_a_row"):
                    self._record(outcome, now)
            if outcome in ("ok", "lease_held", "failed", "crashed"):
                self._inherited_record = False
            self.metrics.observe(summary, outcome, now)
            self.metrics.failures_in_a_row.set(self.failures_in_a_row)
            self.metrics.budget_used.set(len(self.runtime.budget.recent()))
            self.metrics.budget.set(self.runtime.budget.per_minute)
            self.metrics.credential_renewals.set(getattr(self.runtime.store, "renewals", 0))
            if outcome == "ok":
                self.tables(summary)

    def _record(self, outcome: str, now: datetime) -> None:
        """Tell ``poller status`` (another process) why cycles fail, through the bucket."""
        record = CycleRecord(
            self.runtime.run_id,
            socket.gethostname(),
            self.failures_in_a_row,
            FAILURES_BEFORE_RED,
            outcome,
            self.last_error,
        )
        self._failure_record.write(record, now)

    TABLES_RECHECK = timedelta(hours=1)

    def tables(self, summary: Summary) -> None:
        """The query tables of closed days, within ``tables.max_seconds_per_cycle`` (no new
        day is started after it; the next cycle carries on). Never raises."""
        settings = self.runtime.settings
        if not settings.tables.enabled or summary.watermark is None:
            return
        watermark = datetime.fromisoformat(summary.watermark.replace("Z", "+00:00"))
        last_closed = last_closed_day(watermark, timedelta(seconds=settings.sync.lookback_seconds))
        if (
            last_closed == self._tables_through
            and not self._tables_more
            and self._tables_checked is not None
            and self.monotonic() - self._tables_checked < self.TABLES_RECHECK.total_seconds()
        ):
            return
        deadline = time.monotonic() + settings.tables.max_seconds_per_cycle
        try:
            report = self.runtime.tables_pass(deadline=deadline)
        except PollerError as exc:
            self._tables_more = True
            log.error("tables.failed", extra={"fields": {"error": str(exc)}})
            return
        except Stopped:
            log.warning("tables.stopped")
            return
        except Exception:  # a bug must not kill the daemon
            self._tables_more = True
            log.exception("tables.crashed")
            return
        self._tables_checked, self._tables_through = self.monotonic(), last_closed
        self._tables_more = report.days_left > 0 or report.dismissal_scan_paused
        self.metrics.table_parts.inc(report.parts_written)
        self.metrics.tables_pending.set(report.days_left)
        self._progressed()
        if not report.ok:  # a damaged part: the other days went on; the recheck retries it
            log.error("tables.failed", extra={"fields": report.as_dict()})
        elif report.days_built or report.parts_written:
            log.info("tables.done", extra={"fields": report.as_dict()})

    # A CycleObserver: every page and commit is progress, for liveness.
    def started(self, summary: Summary, chunk_count: int) -> None:
        self._progressed()

    def page(self, summary: Summary) -> None:
        self._progressed()

    def committed(self, summary: Summary, chunks_done: int) -> None:
        self._progressed()

    # ------------------------------------------------------------------ health
    def alive(self) -> tuple[bool, dict[str, Any]]:
        """Alive unless nothing has progressed for ``stall_after`` on the monotonic clock (a
        hung cycle, a stalled loop) or FAILURES_BEFORE_RED cycles in a row failed."""
        idle = self.monotonic() - self._progress_at
        state: dict[str, Any] = {
            "last_progress": iso_z(self.last_progress),
            "idle_s": round(idle, 1),
            "stall_after_s": round(self.stall_after.total_seconds()),
            "failed_cycles_in_a_row": self.failures_in_a_row,
        }
        if self.failures_in_a_row >= FAILURES_BEFORE_RED:
            state["reason"] = (
                f"{self.failures_in_a_row} cycles in a row failed; the last: {self.last_error}"
            )
            return False, state
        if idle > self.stall_after.total_seconds():
            state["reason"] = f"nothing progressed for {idle:.0f}s"
            return False, state
        return True, state

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Ready once a cycle succeeded (or found another writer) within 3 intervals."""
        state: dict[str, Any] = {
            "last_outcome": self.last_outcome,
            "last_success": iso_z(self.last_success) if self.last_success else None,
            "failed_cycles_in_a_row": self.failures_in_a_row,
        }
        if self.last_error:
            state["last_error"] = self.last_error
        if self._success_at is None:
            return False, state
        fresh = self.monotonic() - self._success_at <= 3 * self.interval + 60
        return fresh, state

    def serve_http(self, host: str, port: int) -> list[Listener]:
        """/healthz /readyz /metrics, and the push path when receiver.token is set."""
        listeners = start_listeners(
            self.runtime, self.metrics.registry, self.alive, self.ready, host, port
        )
        if listeners:
            self.http_port = listeners[0].port
        if self.runtime.settings.receiver.token and len(listeners) > 1:
            self.push_port = listeners[-1].port
        if not self.runtime.settings.receiver.token:
            log.info(
                "push.off",
                extra={"fields": {"why": "receiver.token is not set: webhooks are answered 404"}},
            )
        return listeners

    # ------------------------------------------------------------------ the loop
    def loop(self, wait: Callable[[float], bool] | None = None) -> None:
        """A cycle at once, then one every ``interval`` seconds of monotonic time from the
        start of the last (a cycle longer than the interval is followed at once: missed
        runs coalesce), until the stop event is set. ``wait(seconds)`` returns True when
        stopped (the stop event's own wait by default; tests inject one)."""
        stop = self.runtime.stop
        wait = wait or stop.wait
        due = self.monotonic()
        while not stop.is_set():
            delay = due - self.monotonic()
            if delay > 0 and wait(delay):
                break
            if stop.is_set():
                break
            started = self.monotonic()
            self.cycle()
            due = max(started + self.interval, self.monotonic())

    def run(self) -> int:
        settings = self.runtime.settings
        try:
            # Before the push path or a cycle writes anything. A store that cannot be used
            # as configured will not get better: exit, and say why and what to set.
            self.runtime.prove_store()
        except PollerError as exc:
            log.error("daemon.refused", extra={"fields": {"error": str(exc)}})
            return exc.exit_code

        def on_signal(signum: int, _frame: object) -> None:
            log.warning("daemon.stopping", extra={"fields": {"signal": signum}})
            self.runtime.stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        servers = self.serve_http(settings.http.host, settings.http.port)
        log.info("daemon.started", extra={"fields": {"interval_s": self.interval}})
        self.loop()  # returns once stopped, after the running cycle has unwound
        for listener in servers:
            listener.stop()
        self.runtime.give_back()  # what the detail fetches took since the last cycle
        log.info("daemon.stopped")
        return 0


def limits(settings: ReceiverSettings, *, tls: bool = True) -> Limits:
    return Limits(
        threads=settings.threads,
        connection_limit=settings.connection_limit,
        connections_per_source=settings.connections_per_source,
        max_header_bytes=settings.max_header_bytes,
        max_body_bytes=settings.max_body_bytes,
        request_timeout_seconds=settings.timeout_seconds,
        idle_timeout_seconds=settings.idle_timeout_seconds,
        tls_cert_file=settings.tls_cert_file if tls else "",
        tls_key_file=settings.tls_key_file if tls else "",
    )


def start_listeners(
    runtime: Runtime,
    registry: CollectorRegistry,
    alive: Health,
    ready: Health,
    host: str,
    port: int,
) -> list[Listener]:
    """The listeners of ``poller run`` and ``poller serve``: health, readiness and metrics
    on (host, port), and the push routes there too, or on their own listener when
    ``receiver.port`` is set (then a flood of the push port never reaches the probes, and
    TLS, if configured, is the push listener's only). Port 0 for health: none."""
    settings = runtime.settings.receiver
    push = runtime.push_parts()
    own_port = push is not None and settings.port != 0
    listeners: list[Listener] = []
    if port != 0:
        app = build_app(registry, health=alive, ready=ready, push=None if own_port else push)
        shared = push is not None and not own_port
        listeners.append(Listener(app, host, port, limits(settings, tls=shared), "http").start())
    if push is not None and own_port:
        app = build_app(registry, push=push, metrics_route=False)
        listeners.append(Listener(app, host, settings.port, limits(settings), "push").start())
    for listener in listeners:
        log.info(
            "http.listening",
            extra={"fields": {"host": host, "port": listener.port, "serves": listener.name}},
        )
    return listeners
