"""The command line: parse, build, call. Exit codes are SPEC's: 0 done, 1 failed, 2 bad usage
or configuration, 75 another run holds the lease."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from poller import __version__
from poller.app import build, new_run_id, run_cycle
from poller.config import REQUIRED_API, REQUIRED_S3, Settings, load_settings
from poller.errors import ConfigError, PollerError, Stopped
from poller.probe import check_bucket
from poller.state import CheckpointStore
from poller.sync import Summary
from poller.timeutil import iso_z, utc_now

log = logging.getLogger("poller")

REQUIREMENTS = {
    "sync": REQUIRED_API + REQUIRED_S3,
    "run": REQUIRED_API + REQUIRED_S3,
    "check": REQUIRED_API + REQUIRED_S3,
    "status": REQUIRED_S3,
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
    commands.add_parser("status", help="print the checkpoint, the lease and the lag")
    commands.add_parser(
        "check", help="validate config, call the Threat Stack self-test, probe the bucket"
    )
    return top


def _emit(document: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document, default=str) + "\n")
    sys.stdout.flush()


def cmd_sync(settings: Settings, run_id: str) -> int:
    runtime = build(settings, "sync", run_id=run_id)
    summary = Summary(mode="sync", run_id=runtime.run_id)
    code = 0
    try:
        run_cycle(runtime, summary)
        log.info("sync.done", extra={"fields": summary.as_dict()})
    except PollerError as exc:
        summary.ok, summary.error, code = False, str(exc), exc.exit_code
        level = logging.WARNING if code == 75 else logging.ERROR
        log.log(level, "sync.failed", extra={"fields": {"error": str(exc), "exit_code": code}})
    except (Stopped, KeyboardInterrupt) as exc:
        # SIGTERM (Kubernetes stopping the pod) or Ctrl-C: the lease was released on the way
        # out, the unfinished chunk is not committed, and the next run picks it up.
        code = 130 if isinstance(exc, KeyboardInterrupt) else 143
        summary.ok, summary.error = False, f"stopped by {'SIGINT' if code == 130 else 'SIGTERM'}"
        log.warning("sync.stopped", extra={"fields": {"exit_code": code}})
    except Exception as exc:  # a bug: still end with a summary and exit 1, nothing committed
        summary.ok, summary.error, code = False, f"unexpected {type(exc).__name__}: {exc}", 1
        log.exception("sync.crashed")
    _emit(summary.as_dict())
    return code


def cmd_run(settings: Settings, run_id: str) -> int:
    from poller.scheduler import Daemon  # apscheduler is only needed here

    return Daemon(build(settings, "run", run_id=run_id), utc_now).run()


def cmd_status(settings: Settings, run_id: str) -> int:
    runtime = build(settings, "status", run_id=run_id)
    checkpoint = CheckpointStore(runtime.store, runtime.layout).load()
    lease = runtime.lease().inspect()
    now = utc_now()
    watermark = checkpoint.watermark
    _emit(
        {
            "bucket": settings.s3.bucket,
            "prefix": settings.s3.prefix,
            "checkpoint": None
            if checkpoint.etag is None
            else {
                "watermark": iso_z(watermark) if watermark else None,
                "seen_ids": len(checkpoint.seen),
                "updated_at": checkpoint.document.get("updated_at"),
                "updated_by": checkpoint.document.get("updated_by"),
                "mode": checkpoint.document.get("mode"),
            },
            "lease": None
            if lease is None
            else {
                **lease.document,
                "age_s": round(lease.age_seconds, 1),
                "stale": lease.stale,
                "free": lease.free,  # released by its holder, or stale
            },
            "lag_s": round((now - watermark).total_seconds(), 1) if watermark else None,
        }
    )
    return 0


def cmd_check(settings: Settings, run_id: str) -> int:
    runtime = build(settings, "check", run_id=run_id)
    report: dict[str, Any] = {"config": "ok"}
    code = 0
    try:
        runtime.api.self_test()
        report["threatstack"] = "ok"
    except PollerError as exc:
        report["threatstack"] = f"failed: {exc}"
        code = 1
    try:
        honoured = check_bucket(runtime.store, runtime.layout, runtime.run_id)
        report["bucket"] = "ok"
        report["conditional_writes"] = honoured
        if not honoured:
            if settings.s3.require_conditional_writes:
                report["bucket"] = (
                    "refused: the store ignores conditional writes; set"
                    " s3.require_conditional_writes=false to run without guards"
                )
                code = 1
            else:
                log.warning(
                    "store.unguarded",
                    extra={
                        "fields": {
                            "message": "conditional writes are ignored; running"
                            " unguarded as configured"
                        }
                    },
                )
    except PollerError as exc:
        report["bucket"] = f"failed: {exc}"
        code = 1
    report["ok"] = code == 0
    _emit(report)
    return code


COMMANDS = {"sync": cmd_sync, "run": cmd_run, "status": cmd_status, "check": cmd_check}


def _stop(signum: int, _frame: object) -> None:
    raise Stopped(signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    try:
        settings = load_settings(args.config, required=REQUIREMENTS[args.command], flags=args.set)
    except ConfigError as exc:
        sys.stderr.write(f"poller: {exc}\n")
        return exc.exit_code
    from poller import logs

    run_id = new_run_id()
    logs.configure(settings.log.level, settings.log.format, run_id)
    try:
        return COMMANDS[args.command](settings, run_id)
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
