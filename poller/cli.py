"""The command line: parse, build, call. Exit codes are SPEC's: 0 done, 1 failed, 2 bad usage
or configuration, 75 another run holds the lease."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from poller import __version__
from poller.app import UNGUARDED, Runtime, Walk, build, new_run_id, run_cycle
from poller.archive.failures import FailureRecord
from poller.archive.probe import FINDINGS, recorded_proof
from poller.archive.revisits import RevisitStore
from poller.archive.state import Checkpoint, CheckpointStore
from poller.archive.store import CREDENTIAL_CODES, BucketProtection
from poller.config import REQUIRED_API, REQUIRED_S3, Settings, load_settings
from poller.errors import (
    ApiAuthError,
    ApiUnavailable,
    ArchiveAccessError,
    ArchiveUnavailable,
    ConfigError,
    PollerError,
    Stopped,
    UnreadableState,
)
from poller.tables.build import TablesReport
from poller.tables.keys import days, last_closed_day
from poller.tables.query import connect, json_value, run_sql
from poller.terminal import (
    ChunkProgress,
    console_for,
    render_check,
    render_rows,
    render_status,
    render_verify,
    wants_text,
)
from poller.terminal import span as span_text
from poller.timeutil import floor_second, iso_z, parse_instant, utc_now
from poller.walks.backfill import BackfillRange, backfill
from poller.walks.progress import Observers, Pace, ProgressLog, minimum_seconds
from poller.walks.sync import Cycle, Summary, chunks

log = logging.getLogger("poller")

REQUIREMENTS = {
    "sync": REQUIRED_API + REQUIRED_S3,
    "run": REQUIRED_API + REQUIRED_S3,
    "check": REQUIRED_API + REQUIRED_S3,
    "status": REQUIRED_S3,
    "backfill": REQUIRED_API + REQUIRED_S3,
    "verify": REQUIRED_API + REQUIRED_S3,
    "serve": REQUIRED_API + REQUIRED_S3,
    "demo": (),
    "tables": REQUIRED_S3,
    "query": REQUIRED_S3,
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="poller", description="Keeps an S3 archive of Threat Stack alerts complete."
    )
    top.add_argument("--version", action="version", version=f"poller {__version__}")
    top.add_argument(
        "--config",
        type=Path,
        help="config file (default: $POLLER_CONFIG, else ./config.yaml if it exists)",
    )
    top.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set sync.first_run_since=7d (repeatable; wins over"
        " file and environment)",
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("sync", help="one incremental cycle, then exit (CronJob entry point)")
    commands.add_parser(
        "run", help="the daemon: a sync every sync.interval_seconds, health and metrics over HTTP"
    )
    catch_up = commands.add_parser(
        "backfill", help="catch up a past range; resumable; never moves the checkpoint back"
    )
    catch_up.add_argument("--since", required=True, metavar="T", help="2026-11-01, 7d, ...")
    catch_up.add_argument("--until", metavar="T", help="default: now minus sync.settle_seconds")
    audit = commands.add_parser(
        "verify", help="compare the API's alert ids with the archive; --repair archives the rest"
    )
    audit.add_argument("--since", required=True, metavar="T", help="2026-11-01, 7d, ...")
    audit.add_argument("--until", metavar="T", help="default: now minus sync.settle_seconds")
    audit.add_argument("--repair", action="store_true", help="archive what is missing")
    audit.add_argument(
        "--checksums",
        action="store_true",
        help="also compare each record's body with its stored SHA-256 (one GET per record)",
    )
    _output_flags(audit)
    for name, text in (
        ("status", "print the checkpoint, the lease and the lag"),
        ("check", "validate config, call the Threat Stack self-test, probe the bucket"),
    ):
        _output_flags(commands.add_parser(name, help=text))
    tables = commands.add_parser(
        "tables", help="build the query tables of closed UTC days that lack them (resumable)"
    )
    tables.add_argument("--since", metavar="T", help="default: the archive's first day")
    tables.add_argument("--until", metavar="T", help="default: the last closed day")
    query = commands.add_parser(
        "query", help="run SQL (DuckDB) over the tables alerts, dismissals and alerts_latest"
    )
    query.add_argument("sql", metavar="SQL", help="one statement, DuckDB's dialect")
    query.add_argument("--since", metavar="T", default="30d", help="first day (default: 30d)")
    query.add_argument("--until", metavar="T", help="last day (default: today)")
    _output_flags(query)
    commands.add_parser(
        "serve", help="only the push path: the webhook receiver (needs receiver.token), no polling"
    )
    demo = commands.add_parser(
        "demo", help="the real daemon against a local simulator and S3 server, no setup"
    )
    demo.add_argument("--alerts", type=int, default=300, help="alerts since yesterday 0:00 UTC")
    demo.add_argument("--interval", type=int, default=10, help="seconds between cycles (10)")
    demo.add_argument("--port", type=int, default=8080, help="the daemon's HTTP port (8080)")
    demo.add_argument("--keep", type=Path, metavar="DIR", help="copy the archive here at the end")
    return top


def _output_flags(command: argparse.ArgumentParser) -> None:
    output = command.add_mutually_exclusive_group()
    output.add_argument(
        "--json", dest="output", action="store_const", const="json", help="print JSON"
    )
    output.add_argument(
        "--text",
        dest="output",
        action="store_const",
        const="text",
        help="print text (the default on a terminal; JSON otherwise)",
    )


def _emit(document: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document, default=str) + "\n")
    sys.stdout.flush()


def cmd_sync(settings: Settings, run_id: str, args: argparse.Namespace) -> int:
    return _walk_command(settings, run_id, "sync", None)


def _instant(text: str, now: datetime, name: str) -> datetime:
    try:
        return floor_second(parse_instant(text, now))
    except ValueError as exc:
        raise ConfigError([f"{name} {text!r}: {exc}"]) from None


def _range(settings: Settings, args: argparse.Namespace) -> tuple[datetime, datetime]:
    """``--since``/``--until`` as whole seconds, ending no later than now minus settle."""
    now = utc_now()
    live_edge = floor_second(now - timedelta(seconds=settings.sync.settle_seconds))
    since = _instant(args.since, now, "--since")
    until = live_edge if args.until is None else _instant(args.until, now, "--until")
    until = min(until, live_edge)  # the still-filling edge is the live cycle's business
    if since >= until:
        raise ConfigError([f"--since {iso_z(since)} is not before --until {iso_z(until)}"])
    return since, until


def cmd_verify(settings: Settings, run_id: str, args: argparse.Namespace) -> int:
    since, until = _range(settings, args)
    runtime = build(settings, "verify", run_id=run_id)
    summary = Summary(mode="verify", run_id=run_id)
    ts = settings.threatstack
    pace = Pace(len(ts.statuses) * 60.0 / ts.requests_per_minute)
    progress = ChunkProgress(console_for(sys.stderr), pace) if sys.stderr.isatty() else None
    verifier = runtime.verifier(
        Observers(
            *([progress] if progress else []), ProgressLog(pace, settings.log.progress_seconds)
        )
    )
    if args.repair:
        runtime.prove_store()  # before the first write
    try:
        with runtime.requests.measure(summary):
            findings = verifier.run(since, until, args.repair, summary, args.checksums)
    finally:
        if progress is not None:
            progress.close()
        _mark_tables_due(runtime)
        runtime.give_back()
    report = summary.as_dict() | findings.as_dict()
    summary.ok = findings.complete
    report["ok"] = summary.ok
    log.info("verify.done", extra={"fields": {k: v for k, v in report.items() if k != "days"}})
    _report(report, args.output, render_verify)
    return 0 if findings.complete else 1


def cmd_backfill(settings: Settings, run_id: str, args: argparse.Namespace) -> int:
    since, until = _range(settings, args)
    span = BackfillRange(since, until, to_now=args.until is None)
    size = timedelta(seconds=settings.sync.max_window_seconds)
    count = sum(1 for _ in chunks(since, until, size, aligned=True))
    statuses = len(settings.threatstack.statuses)
    floor_s = minimum_seconds(count, statuses, settings.threatstack.requests_per_minute)
    plan = {
        "window": {"from": iso_z(since), "until": iso_z(until)},
        "chunks": count,
        "min_requests": count * statuses,
        "min_duration_s": round(floor_s),
    }
    log.info("backfill.plan", extra={"fields": plan})
    if sys.stderr.isatty():
        console_for(sys.stderr).print(
            f"backfill {iso_z(since)} → {iso_z(until)}: {count} chunks, at least"
            f" {count * statuses} API requests; at {settings.threatstack.requests_per_minute}"
            f" requests/min that is at least {span_text(floor_s)} (more with more alerts)."
            " Interrupt it at any time: a rerun skips the finished chunks."
        )

    def work(runtime: Runtime, cycle: Cycle, summary: Summary) -> None:
        backfill(cycle, runtime.chunk_records(), span, summary)

    return _walk_command(settings, run_id, "backfill", work)


def _walk_command(
    settings: Settings,
    run_id: str,
    mode: str,
    walk: Walk | None,
) -> int:
    """sync and backfill: one walk under the lease, progress, the summary last on stdout."""
    runtime = build(settings, mode, run_id=run_id)
    summary = Summary(mode=mode, run_id=runtime.run_id)
    code = 0
    ts = settings.threatstack
    pace = Pace(len(ts.statuses) * 60.0 / ts.requests_per_minute)
    # A long first run or catch-up shows a progress bar when a person watches stderr.
    progress = ChunkProgress(console_for(sys.stderr), pace) if sys.stderr.isatty() else None
    observers = Observers(
        *([progress] if progress else []), ProgressLog(pace, settings.log.progress_seconds)
    )
    try:
        run_cycle(runtime, summary, observers, walk)
        log.info(f"{mode}.done", extra={"fields": summary.as_dict()})
    except PollerError as exc:
        summary.ok, summary.error, code = False, str(exc), exc.exit_code
        level = logging.WARNING if code == 75 else logging.ERROR
        log.log(level, f"{mode}.failed", extra={"fields": {"error": str(exc), "exit_code": code}})
    except (Stopped, KeyboardInterrupt) as exc:
        # SIGTERM (Kubernetes stopping the pod) or Ctrl-C: the lease was released on the way
        # out, the unfinished chunk is not committed, and the next run picks it up.
        code = 130 if isinstance(exc, KeyboardInterrupt) else 143
        summary.ok, summary.error = False, f"stopped by {'SIGINT' if code == 130 else 'SIGTERM'}"
        log.warning(f"{mode}.stopped", extra={"fields": {"exit_code": code}})
    except Exception as exc:  # a bug: still end with a summary and exit 1, nothing committed
        summary.ok, summary.error, code = False, f"unexpected {type(exc).__name__}: {exc}", 1
        log.exception(f"{mode}.crashed")
    finally:
        if progress is not None:
            progress.close()
        if mode == "backfill":
            _mark_tables_due(runtime)
    _emit(summary.as_dict())
    return code


def _mark_tables_due(runtime: Runtime) -> None:
    """A backfill or a repair archived into these days: their tables are built again."""
    try:
        marked = runtime.mark_tables_due()
    except PollerError as exc:  # the archive is done; say what the tables miss
        log.warning("tables.mark_failed", extra={"fields": {"error": str(exc)}})
        return
    if marked:
        log.info("tables.due", extra={"fields": {"days": marked}})


def _day(text: str | None, now: datetime, name: str) -> date | None:
    return None if text is None else _instant(text, now, name).date()


def cmd_tables(settings: Settings, run_id: str, args: argparse.Namespace) -> int:
    """Build the query tables; the JSON report is the last line on stdout."""
    now = utc_now()
    since, until = _day(args.since, now, "--since"), _day(args.until, now, "--until")
    if since is not None and until is not None and since > until:
        raise ConfigError([f"--since {since} is after --until {until}"])
    runtime = build(settings, "tables", run_id=run_id)
    report = TablesReport()
    code = 0
    started = time.monotonic()
    try:
        runtime.prove_store()  # before the first part is written, as every writing command
        report = runtime.tables_pass(since, until)
        if report.last_closed is None:
            log.warning(
                "tables.nothing_closed",
                extra={"fields": {"why": "no checkpoint yet, or no UTC day has closed"}},
            )
        if not report.ok:  # a damaged part: the other days were built
            code = 1
            log.error("tables.failed", extra={"fields": {"error": report.error, "exit_code": 1}})
        else:
            log.info("tables.done", extra={"fields": report.as_dict()})
    except PollerError as exc:
        report.ok, report.error, code = False, str(exc), exc.exit_code
        log.error("tables.failed", extra={"fields": {"error": str(exc), "exit_code": code}})
    except (Stopped, KeyboardInterrupt) as exc:
        # Parts are whole objects written create-only: a rerun carries on where this ended.
        code = 130 if isinstance(exc, KeyboardInterrupt) else 143
        report.ok, report.error = False, "stopped"
        log.warning("tables.stopped", extra={"fields": {"exit_code": code}})
    report.duration_s = round(time.monotonic() - started, 3)
    _emit(report.as_dict())
    return code


def cmd_query(settings: Settings, run_id: str, args: argparse.Namespace) -> int:
    """SQL over the cached parts of the range; rows on stdout and nothing else there."""
    now = utc_now()
    since = _instant(args.since, now, "--since").date()
    until = now.date() if args.until is None else _instant(args.until, now, "--until").date()
    if since > until:
        raise ConfigError([f"--since {since} is after --until {until}"])
    runtime = build(settings, "query", run_id=run_id)
    cache = runtime.part_cache()
    fetched = cache.fetch(since, until)
    notice = {
        "cache": str(fetched.folder),
        "downloaded": fetched.downloaded,
        "reused": fetched.reused,
        "days": {"from": since.isoformat(), "until": until.isoformat()},
        "days_with_alerts": len(fetched.days["alerts"]),
    }
    log.info("query.parts", extra={"fields": notice})
    missing = _days_without_tables(runtime, since, until, fetched.days["alerts"])
    if missing:
        log.warning("query.no_tables", extra={"fields": {"message": missing}})
    if sys.stderr.isatty():
        console = console_for(sys.stderr)
        console.print(
            f"[dim]{len(fetched.days['alerts'])} days of tables, cache {fetched.folder}"
            f" ({fetched.downloaded} fetched, {fetched.reused} reused)[/dim]"
        )
        if missing:
            console.print(f"[yellow]{missing}[/yellow]")
    # DuckDB's spill folder: a private one, gone with the query (see connect).
    with tempfile.TemporaryDirectory(prefix="poller-query-") as spill:
        con = connect(fetched.files, fetched.parts, Path(spill))
        try:
            answer = run_sql(con, args.sql, fetched.parts)
        finally:
            con.close()
    if wants_text(sys.stdout, args.output):
        console_for(sys.stdout).print(render_rows(answer.columns, answer.rows))
    else:
        for row in answer.rows:
            document = {c: json_value(v) for c, v in zip(answer.columns, row, strict=True)}
            sys.stdout.write(json.dumps(document, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    return 0


def _days_without_tables(runtime: Runtime, since: date, until: date, built: list[str]) -> str:
    """When days of the range have no tables: which are not closed yet, which wait for
    ``poller tables``, which lie before the archive's first day (one LIST request to find
    it). Empty when every day has them."""
    have = set(built)
    lacking = [d for d in days(since, until) if d.isoformat() not in have]
    if not lacking:
        return ""
    last_closed = last_closed_day(
        runtime.watermark(), timedelta(seconds=runtime.settings.sync.lookback_seconds)
    )
    open_days = [d for d in lacking if last_closed is None or d > last_closed]
    closed = [d for d in lacking if last_closed is not None and d <= last_closed]
    # poller tables starts at the archive's first day: the days before it get no tables.
    first = runtime.tables_builder().first_day()
    before = [d for d in closed if first is None or d < first]
    unbuilt = [d for d in closed if first is not None and d >= first]
    parts = []
    if before:
        first_text = "none archived yet" if first is None else f"it starts on {first}"
        parts.append(
            f"before the archive's first day ({first_text}), nothing to table: {_day_span(before)}"
        )
    if open_days:
        parts.append(
            f"not closed yet: {_day_span(open_days)} (a day is closed once the archive's"
            f" watermark is {runtime.settings.sync.lookback_seconds} s past its end)"
        )
    if unbuilt:
        parts.append(f"closed but without tables: {_day_span(unbuilt)} (run poller tables)")
    return "no tables for some days of the range; " + "; ".join(parts)


def _day_span(listed: list[date]) -> str:
    if len(listed) == 1:
        return listed[0].isoformat()
    return f"{listed[0].isoformat()} .. {listed[-1].isoformat()} ({len(listed)} days)"


def cmd_run(settings: Settings, run_id: str, args: argparse.Namespace) -> int:
    from poller.serving.daemon import Daemon

    return Daemon(build(settings, "run", run_id=run_id), utc_now).run()


def _report(document: dict[str, Any], output: str | None, render: Any) -> None:
    """Text for people, JSON for programs (see poller.terminal for the rule)."""
    if wants_text(sys.stdout, output):
        console_for(sys.stdout).print(render(document))
    else:
        _emit(document)


def cmd_status(settings: Settings, run_id: str, args: argparse.Namespace) -> int:
    runtime = build(settings, "status", run_id=run_id)
    unreadable: dict[str, str] = {}
    try:
        checkpoint = CheckpointStore(runtime.store, runtime.layout).load()
    except UnreadableState as exc:
        checkpoint, unreadable["checkpoint"] = Checkpoint(), str(exc)
    lease = runtime.lease().inspect()
    now = utc_now()
    watermark = checkpoint.watermark
    _report(
        {
            "bucket": settings.s3.bucket,
            "prefix": settings.s3.prefix,
            "checkpoint": {"unreadable": unreadable["checkpoint"]}
            if "checkpoint" in unreadable
            else None
            if checkpoint.etag is None
            else {
                "watermark": iso_z(watermark) if watermark else None,
                "seen_ids": len(checkpoint.seen),
                "updated_at": checkpoint.document.get("updated_at"),
                "updated_by": checkpoint.document.get("updated_by"),
                "mode": checkpoint.document.get("mode"),
                "run": checkpoint.document.get("run"),
            },
            "lease": None
            if lease is None
            else {"unreadable": lease.problem, "age_s": round(lease.age_seconds, 1)}
            if lease.problem
            else {
                # The holding's token is the holder's own business (it recognises its writes
                # by it); its request times are the budget's: their count says enough.
                **{k: v for k, v in lease.document.items() if k not in LEASE_PRIVATE},
                "recent_requests": len(lease.document.get("recent_requests") or []),
                "age_s": round(lease.age_seconds, 1),
                "stale": lease.stale,
                "free": lease.free,  # released by its holder, or stale
            },
            "lag_s": round((now - watermark).total_seconds(), 1) if watermark else None,
            "pending": _pending(runtime.pending().ids()),
            "unfetchable": _pending(runtime.pending().unfetchable()),
            "store": _store_status(runtime),
            "tables": _tables_status(runtime, watermark),
            "revisit": _revisit(RevisitStore(runtime.store, runtime.layout), now),
            # Why a daemon's cycles fail, as it last said (None: no daemon ever failed here).
            "daemon": FailureRecord(runtime.store, runtime.layout).read(),
        },
        args.output,
        lambda document: render_status(document, now),
    )
    return 0


def _store_status(runtime: Runtime) -> dict[str, Any] | None:
    """The store's last recorded proof (see poller.archive.probe), and what is lost when it
    runs without conditional writes; None when no run has proved it today."""
    proof = recorded_proof(runtime.store, runtime.layout, runtime.fingerprint())
    if proof is None:
        return None
    document: dict[str, Any] = {
        "proven_at": proof.recorded_at,
        "keeps_bodies": proof.keeps_bodies,
        "conditional_writes": proof.conditional_writes,
    }
    if not proof.conditional_writes:
        document["unguarded"] = UNGUARDED
    return document


def _tables_status(runtime: Runtime, watermark: datetime | None) -> dict[str, Any]:
    """The last closed day with tables, and the closed days still owed them."""
    builder = runtime.tables_builder()
    plan = builder.plan(watermark)
    last = plan.last_day_with_tables()
    waiting = builder.waiting_days(plan)
    pending = [day for day in plan.due if day not in waiting]
    return {
        "enabled_in_daemon": runtime.settings.tables.enabled,
        "last_closed": plan.last_closed.isoformat() if plan.last_closed else None,
        "last_day_with_tables": last.isoformat() if last else None,
        "pending": len(pending),
        "pending_days": [day.isoformat() for day in pending[:30]],  # the oldest 30
        # Built, kept due only until a later day closes (their dismissals go there).
        "waiting_days": [day.isoformat() for day in waiting[:30]],
    }


def _revisit(states: RevisitStore, now: datetime) -> dict[str, Any]:
    """The last finished revisit (when, its range, dismissals archived), the one under way,
    and how many dismissed alerts it remembers as handled; ``{"unreadable": why}`` when its
    state is not what poller writes (status still shows the rest, as for the checkpoint)."""
    try:
        state = states.load()
    except UnreadableState as exc:
        return {"unreadable": str(exc)}
    last = state.last
    started = last.get("started_at") if last else None
    lag = None
    if isinstance(started, str):
        lag = round((now - parse_instant(started, now)).total_seconds(), 1)
    return {"last": last, "current": state.current, "handled": len(state.handled), "lag_s": lag}


LEASE_PRIVATE = ("token", "recent_requests")


def _pending(ids: list[str]) -> dict[str, Any]:
    """Pushed alerts still owed a full record (the next sync writes them), or given up on
    (``_poller/unfetchable/<id>`` says why)."""
    return {"count": len(ids), "ids": sorted(ids)[:20]}


def fix_for(error: PollerError) -> str:
    """What to do about a failed check, in one line."""
    text = str(error)
    if isinstance(error, ApiAuthError):
        if "403" in text:
            return "give the API key's user permission to read alerts in this organisation"
        return (
            "check THREATSTACK_USER_ID, THREATSTACK_ORG_ID and THREATSTACK_API_KEY (or their"
            " _FILE forms), and this machine's clock"
        )
    if isinstance(error, ApiUnavailable):
        return "check THREATSTACK_BASE_URL and that this machine can reach it (proxy, firewall)"
    if isinstance(error, ArchiveAccessError):
        if any(code in text for code in CREDENTIAL_CODES):
            return (
                "S3 refused the AWS credentials (expired, rotated or wrong): renew them (the"
                " rotated key file, a new session token, the IRSA role); the daemon re-reads"
                " them on its own"
            )
        if "NoSuchBucket" in text:
            return "create the bucket, or set TS_AWS_S3_BUCKET to an existing one"
        if "credentials" in text:
            return "provide AWS credentials (AWS_PROFILE, AWS_ACCESS_KEY_ID, or IRSA in Kubernetes)"
        return "allow s3:GetObject, s3:PutObject, s3:DeleteObject and s3:ListBucket on the prefix"
    if isinstance(error, ArchiveUnavailable):
        return "check AWS_ENDPOINT_URL_S3, the region, and that this machine can reach S3"
    return "see the message above"


def cmd_check(settings: Settings, run_id: str, args: argparse.Namespace) -> int:
    runtime = build(settings, "check", run_id=run_id)
    report: dict[str, Any] = {"config": "ok"}
    fixes: dict[str, str] = {}
    code = 0
    try:
        runtime.api.self_test()
        report["threatstack"] = "ok"
    except PollerError as exc:
        report["threatstack"] = f"failed: {exc}"
        fixes["threatstack"] = fix_for(exc)
        code = 1
    finally:
        runtime.give_back()
    try:
        proof = runtime.probe(fresh=True)  # check always asks the store afresh
        report["bucket"] = "ok"
        report["conditional_writes"] = proof.conditional_writes
        require = settings.s3.require_conditional_writes
        for finding in proof.findings:
            if finding.ok:
                report[finding.name] = "ok"
            elif finding.name in ("create_only", "compare_and_swap") and not require:
                report[finding.name] = f"allowed: {finding.detail}"
                report["unguarded"] = UNGUARDED
            else:
                report[finding.name] = f"failed: the store {finding.detail}"
                fixes[finding.name] = finding.fix
                code = 1
        for name in FINDINGS:
            report.setdefault(name, "not run (the write failed)")
    except PollerError as exc:
        report["bucket"] = f"failed: {exc}"
        fixes["bucket"] = fix_for(exc)
        code = 1
    if report.get("bucket") == "ok":
        report["evidence"] = _evidence(runtime.store.protection(), settings)
    report["ok"] = code == 0
    if fixes:
        report["fix"] = fixes
    _report(report, args.output, render_check)
    return code


def _evidence(protection: BucketProtection, settings: Settings) -> dict[str, Any]:
    """Whether the bucket keeps what poller writes as evidence: a warning, never a failure."""
    s3 = settings.s3
    evidence: dict[str, Any] = {
        "versioning": protection.versioning or "unknown (not allowed to ask)",
        "object_lock": protection.object_lock or "unknown (not allowed to ask)",
        "encryption": protection.encryption or "unknown (not allowed to ask)",
        "checksums": "SHA-256 on every object" if s3.checksums else "off",
        "retention": f"{s3.object_lock_mode} {s3.object_lock_days} days on archived records"
        if s3.object_lock_mode
        else "none set by poller",
    }
    if not protection.evidence_grade and not s3.object_lock_mode:
        evidence["warning"] = (
            "anyone who can write to this bucket can delete or replace archived alerts:"
            " enable versioning and Object Lock on the bucket (and optionally"
            " s3.object_lock_mode/days) if the archive is evidence"
        )
        log.warning("check.evidence", extra={"fields": {"warning": evidence["warning"]}})
    return evidence


def cmd_serve(settings: Settings, run_id: str, args: argparse.Namespace) -> int:
    """The push path alone, until SIGTERM or Ctrl-C; pending full records are fetched within
    this process's budget, and a sync elsewhere covers what it leaves."""
    if not settings.receiver.token:
        raise ConfigError(
            ["receiver.token: required for poller serve (set POLLER_RECEIVER__TOKEN_FILE)"]
        )
    runtime = build(settings, "serve", run_id=run_id)
    runtime.prove_store()  # before the first webhook is written
    stop = runtime.stop

    def alive() -> tuple[bool, dict[str, Any]]:
        return True, {}

    from prometheus_client import CollectorRegistry

    from poller.serving.daemon import start_listeners

    port = settings.http.port or 8080
    listeners = start_listeners(
        runtime, CollectorRegistry(), alive, alive, settings.http.host, port
    )
    log.info(
        "serve.listening",
        extra={"fields": {"host": settings.http.host, "ports": [x.port for x in listeners]}},
    )

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    for listener in listeners:
        listener.stop()
    runtime.give_back()
    log.info("serve.stopped")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from poller.demo import run_demo  # the simulator and moto are only needed here

    return run_demo(alerts=args.alerts, interval=args.interval, port=args.port, keep=args.keep)


COMMANDS = {
    "sync": cmd_sync,
    "backfill": cmd_backfill,
    "verify": cmd_verify,
    "serve": cmd_serve,
    "run": cmd_run,
    "status": cmd_status,
    "check": cmd_check,
    "tables": cmd_tables,
    "query": cmd_query,
}


def _stop(signum: int, _frame: object) -> None:
    raise Stopped(signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    if args.command == "demo":  # nothing to configure: it brings its own world
        from poller import logs

        logs.configure("WARNING", "auto", new_run_id())
        try:
            return cmd_demo(args)
        except KeyboardInterrupt:
            return 130
    try:
        settings = load_settings(args.config, required=REQUIREMENTS[args.command], flags=args.set)
    except ConfigError as exc:
        sys.stderr.write(f"poller: {exc}\n")
        return exc.exit_code
    from poller import logs

    run_id = new_run_id()
    logs.configure(settings.log.level, settings.log.format, run_id)
    try:
        return COMMANDS[args.command](settings, run_id, args)
    except PollerError as exc:
        log.error("failed", extra={"fields": {"error": str(exc), "exit_code": exc.exit_code}})
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Stopped:
        return 143
    except Exception:  # a bug: logged with its traceback (JSON logs too), exit 1
        log.exception("crashed", extra={"fields": {"command": args.command}})
        return 1
