"""What a person reads on a terminal: progress of long walks, and readable reports of
``status`` and ``check``. rich renders everything here; nothing here decides anything.

The rule for every command that has both: JSON with ``--json``, text with ``--text``, and
otherwise text when stdout is a terminal, JSON when it is not (a pipe, a file, a CronJob's
log), so scripts never parse text by accident.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, TextIO

from rich.console import Console, Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from poller.walks.progress import Pace
from poller.walks.sync import Summary


def wants_text(stream: TextIO, output: str | None) -> bool:
    """``output`` is "json", "text" or None (decide by whether ``stream`` is a terminal)."""
    if output is not None:
        return output == "text"
    return stream.isatty()


def span(seconds: float | None) -> str:
    """A duration for people: ``2h 05m``, ``3m 12s``, ``45s``."""
    if seconds is None:
        return "-"
    whole = round(abs(seconds))
    days, rest = divmod(whole, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    sign = "-" if seconds < 0 else ""
    if days:
        return f"{sign}{days}d {hours:02d}h"
    if hours:
        return f"{sign}{hours}h {minutes:02d}m"
    if minutes:
        return f"{sign}{minutes}m {secs:02d}s"
    return f"{sign}{secs}s"


class ChunkProgress:
    """A progress bar over the chunks of a long window (a CycleObserver), on stderr: chunks
    done and skipped, alerts, rate, and an ETA that the request budget bounds from below
    (see poller.walks.progress). A one-chunk cycle shows nothing: it is over in seconds."""

    def __init__(self, console: Console, pace: Pace) -> None:
        self._console = console
        self._pace = pace
        self._progress: Progress | None = None
        self._task: Any = None

    def started(self, summary: Summary, chunk_count: int) -> None:
        self._pace.start(chunk_count)
        if chunk_count < 2:
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("chunks · {task.fields[alerts]}"),
            TimeElapsedColumn(),
            TextColumn("· eta {task.fields[eta]}"),
            console=self._console,
            transient=False,
        )
        alerts, eta = self._fields(summary)
        self._task = self._progress.add_task(
            summary.mode, total=chunk_count, alerts=alerts, eta=eta
        )
        self._progress.start()

    def page(self, summary: Summary) -> None:
        if self._progress is not None:
            alerts, eta = self._fields(summary)
            self._progress.update(self._task, alerts=alerts, eta=eta)

    def committed(self, summary: Summary, chunks_done: int) -> None:
        if self._progress is not None:
            alerts, eta = self._fields(summary)
            self._progress.update(self._task, completed=chunks_done, alerts=alerts, eta=eta)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def _fields(self, summary: Summary) -> tuple[str, str]:
        skipped = f", {summary.chunks_skipped} skipped" if summary.chunks_skipped else ""
        alerts = (
            f"{summary.archived} archived, {summary.already_archived} already,"
            f" {summary.quarantined} quarantined{skipped}"
            f" · {self._pace.alerts_per_second(summary):.0f}/s"
        )
        return alerts, span(self._pace.eta_seconds(summary))


COUNT_ORDER = ("listed", "archived", "already_archived", "quarantined")


def render_status(report: dict[str, Any], now: datetime) -> Table:
    """``poller status`` for people: where the archive is, how far behind, who holds it."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()

    def row(label: str, value: str | Text) -> None:
        table.add_row(label, value if isinstance(value, Text) else Text(value))  # no markup

    prefix = report.get("prefix") or ""
    row("archive", f"s3://{report['bucket']}/{prefix}")
    checkpoint = report.get("checkpoint")
    if checkpoint is None:
        row("checkpoint", "none yet: the first run starts at sync.first_run_since")
    elif "unreadable" in checkpoint:
        row("checkpoint", Text(checkpoint["unreadable"], style="bold red"))
    else:
        lag = report.get("lag_s")
        row("watermark", f"{checkpoint['watermark']}  (lag {span(lag)})")
        run = checkpoint.get("run") or {}
        counts = ", ".join(
            f"{run[name]} {name.replace('_', ' ')}" for name in COUNT_ORDER if name in run
        )
        row(
            "last commit",
            f"{checkpoint.get('updated_at')} by run {checkpoint.get('updated_by')}"
            f" ({checkpoint.get('mode')})" + (f": {counts}" if counts else ""),
        )
        row("seen ids", str(checkpoint.get("seen_ids", 0)))
    row("lease", _lease_line(report.get("lease")))
    daemon = report.get("daemon")
    if daemon and daemon.get("failed_cycles_in_a_row"):
        failed, red = daemon["failed_cycles_in_a_row"], daemon.get("red_after")
        style = "bold red" if isinstance(red, int) and failed >= red else "yellow"
        row(
            "daemon",
            Text(
                f"{failed} cycles in a row failed (as of {daemon.get('at')}, run"
                f" {daemon.get('run_id')} on {daemon.get('host')}; /healthz is red from"
                f" {red}); the last: {daemon.get('last_error')}",
                style,
            ),
        )
    store = report.get("store")
    if store is None:
        row("store", "not proved today (the next writing run proves it; poller check now)")
    elif store.get("conditional_writes"):
        row("store", Text(f"proved {store.get('proven_at')}: bodies kept, conditional writes"))
    else:
        row("store", Text(f"proved {store.get('proven_at')}: {store.get('unguarded')}", "yellow"))
    revisit = report.get("revisit") or {}
    if "unreadable" in revisit:
        row("revisit", Text(revisit["unreadable"], style="bold red"))
    elif revisit.get("last") or revisit.get("current"):
        row("revisit", _revisit_line(revisit))
    pending = report.get("pending") or {}
    if pending.get("count"):
        row(
            "pushed, owed",
            f"{pending['count']} full records (the next sync writes them):"
            f" {' '.join(pending['ids'])}",
        )
    gone = report.get("unfetchable") or {}
    if gone.get("count"):
        row(
            "pushed, unfetchable",
            f"{gone['count']} full records given up on (the reason is in"
            f" _poller/unfetchable/<id>): {' '.join(gone['ids'])}",
        )
    tables = report.get("tables")
    if tables and tables.get("last_closed"):  # no row before the first closed day
        last = tables.get("last_day_with_tables") or "none yet"
        due = tables.get("pending_days") or []
        count = tables.get("pending", len(due))
        pending = f"{count} days pending: {' '.join(due[:10])}" if due else "nothing pending"
        waits = tables.get("waiting_days") or []
        if waits:  # built; kept due until a later day, where their dismissals go, closes
            pending += f"; {len(waits)} built, waiting for a later day's dismissals"
        row("query tables", f"through {last} (last closed {tables.get('last_closed')}); {pending}")
    return table


def render_rows(columns: list[str], rows: list[tuple[Any, ...]]) -> Table:
    """``poller query`` on a terminal: the answer as a table (cells as plain text)."""
    table = Table(show_lines=False, header_style="bold")
    for name in columns:
        table.add_column(name, overflow="fold")
    for values in rows:
        table.add_row(*(Text("" if v is None else str(v)) for v in values))
    table.caption = f"{len(rows)} rows"
    return table


def _revisit_line(revisit: dict[str, Any]) -> Text:
    """When the last revisit ran, over which creation times, what it archived."""
    last, current = revisit.get("last"), revisit.get("current")
    if not last:
        text = "none finished yet"
    else:
        text = (
            f"{last.get('started_at')} ({span(revisit.get('lag_s'))} ago), created"
            f" {last.get('from')} → {last.get('until')}: {last.get('archived', 0)} dismissals"
            f" archived of {last.get('listed', 0)} dismissed alerts listed"
        )
    if current:
        text += f"; one under way since {current.get('started_at')}, at {current.get('cursor')}"
        if current.get("pieces"):
            text += f" ({len(current['pieces'])} pieces of the next day left)"
    return Text(text + f"; {revisit.get('handled', 0)} handled ids kept")


def _lease_line(lease: dict[str, Any] | None) -> Text:
    if lease is None:
        return Text("free (never taken)", style="green")
    if "unreadable" in lease:
        return Text(
            f"unreadable ({lease['unreadable']}): not a lease poller wrote; runs refuse it"
            " until it is deleted",
            style="bold red",
        )
    who = (
        f"run {lease.get('run_id')} ({lease.get('mode')})"
        f" on {lease.get('host')} pid {lease.get('pid')}"
    )
    age = span(lease.get("age_s"))
    if lease.get("released"):
        return Text(f"free: released by {who}, {age} ago", style="green")
    if lease.get("stale"):
        return Text(f"free: stale, held by {who}, last renewed {age} ago", style="yellow")
    ttl = lease.get("ttl_seconds")
    return Text(f"held by {who}, renewed {age} ago (ttl {ttl}s)", style="cyan")


CHECK_LABELS = (
    ("config", "configuration"),
    ("threatstack", "Threat Stack"),
    ("bucket", "bucket"),
    ("write", "probe write"),
    ("read_back", "read back"),
    ("create_only", "create-only"),
    ("compare_and_swap", "compare+swap"),
)


def render_check(report: dict[str, Any]) -> Group:
    """``poller check`` for people: a line per check with its verdict, and the fix."""
    lines: list[Text] = []
    fixes = report.get("fix") or {}
    for key, label in CHECK_LABELS:
        if key not in report and key in ("write", "read_back", "create_only", "compare_and_swap"):
            continue  # the bucket could not be reached: its line says why
        verdict = str(report.get(key, "not run"))
        ok = verdict == "ok"
        allowed = verdict.startswith("allowed:")
        line = Text()
        if allowed:
            line.append("! ", style="bold yellow")
        else:
            line.append("✓ " if ok else "✗ ", style="bold green" if ok else "bold red")
        line.append(f"{label:<14}", style="bold")
        detail = verdict
        if key == "bucket" and ok:
            detail = "ok: reachable"
        line.append(detail)
        lines.append(line)
        if (allowed and key == "compare_and_swap") or (
            allowed and "compare_and_swap" not in report
        ):
            lines.append(Text(f"  {'':<14}lost: {report.get('unguarded')}", style="yellow"))
        if not ok and key in fixes:
            lines.append(Text(f"  {'':<14}fix: {fixes[key]}", style="yellow"))
    evidence = report.get("evidence")
    if evidence:
        line = Text()
        warned = "warning" in evidence
        line.append("! " if warned else "✓ ", style="bold yellow" if warned else "bold green")
        line.append(f"{'evidence':<14}", style="bold")
        line.append(
            f"versioning {evidence['versioning']}, object lock {evidence['object_lock']},"
            f" encryption {evidence['encryption']}, checksums {evidence['checksums']},"
            f" retention {evidence['retention']}"
        )
        lines.append(line)
        if warned:
            lines.append(Text(f"  {'':<14}{evidence['warning']}", style="yellow"))
    passed = bool(report.get("ok"))
    summary = Text(
        "all checks passed" if passed else "some checks failed",
        style="bold green" if passed else "bold red",
    )
    return Group(*lines, summary)


def console_for(stream: TextIO) -> Console:
    return Console(file=stream, highlight=False, soft_wrap=True)


def render_verify(report: dict[str, Any]) -> Group:
    """``poller verify`` for people: a row per day (every day of a range up to 31 days,
    else only the days with something to say), the ids, and the verdict."""
    days = report.get("days", [])
    table = Table(
        "day", "API", "full records", "webhook records", "missing", "unknown", "dismissals missing"
    )
    shown = days if len(days) <= 31 else [d for d in days if _day_has_news(d)]
    for day in shown:
        missing = day["missing"]["alerts"] + day["missing"]["webhooks"]
        unknown = day["unknown"]["alerts"] + day["unknown"]["webhooks"]
        table.add_row(
            day["day"],
            str(day["api"]),
            str(day["archived"]["alerts"]),
            str(day["archived"]["webhooks"]),
            Text(str(missing), style="bold red" if missing else ""),
            Text(str(unknown), style="yellow" if unknown else ""),
            _dismissals_cell(day),
        )
    total = sum(d["api"] for d in days)
    table.add_row(
        Text("all", style="bold"),
        str(total),
        str(sum(d["archived"]["alerts"] for d in days)),
        str(sum(d["archived"]["webhooks"] for d in days)),
        str(sum(report["missing_count"].values())),
        str(sum(report["unknown_count"].values())),
        str(report.get("dismissals_missing_count", 0)),
    )
    parts: list[Any] = [table]
    if len(days) > len(shown):
        parts.append(Text(f"({len(days) - len(shown)} complete days not shown)"))
    for title, ids, counts in (
        ("missing", report["missing"], report["missing_count"]),
        ("in the archive, unknown to the API", report["unknown"], report["unknown_count"]),
    ):
        for kind in ("alerts", "webhooks"):
            if counts[kind]:
                more = counts[kind] - len(ids[kind])
                tail = f" … and {more} more" if more > 0 else ""
                parts.append(Text(f"{kind} {title} ({counts[kind]}): {' '.join(ids[kind])}{tail}"))
    if report.get("dismissals_missing_count"):
        count = report["dismissals_missing_count"]
        ids = report.get("dismissals_missing", [])
        more = count - len(ids)
        tail = f" … and {more} more" if more > 0 else ""
        parts.append(
            Text(f"dismissed in the API, archived active ({count}): {' '.join(ids)}{tail}")
        )
    if report.get("dismissals_repaired"):
        parts.append(
            Text(
                f"repaired {report['dismissals_repaired']} dismissal records (create-only)",
                style="green",
            )
        )
    if report.get("checksums_checked"):
        bad = report.get("checksum_mismatch_count", 0)
        parts.append(
            Text(
                f"checksums: {report['checksums_checked']} records read, {bad} altered,"
                f" {report.get('checksum_absent', 0)} written without a checksum"
                + (f": {' '.join(report['checksum_mismatch'])}" if bad else ""),
                style="bold red" if bad else "",
            )
        )
    if report.get("manifest_checked") or report.get("manifest_chain_broken"):
        changed = report.get("manifest_mismatch_count", 0)
        broken = report.get("manifest_chain_broken") or []
        parts.append(
            Text(
                f"manifests: {report.get('manifest_checked', 0)} records compared, {changed}"
                " changed since their day closed"
                + (f": {' '.join(report['manifest_mismatch'])}" if changed else "")
                + (f"; manifests changed: {' '.join(broken)}" if broken else "")
                + f"; {report.get('not_in_manifest', 0)} added after their day closed",
                style="bold red" if changed or broken else "",
            )
        )
    if report.get("repaired"):
        parts.append(Text(f"repaired {report['repaired']} alerts (create-only)", style="green"))
    if report.get("quarantined_count"):
        parts.append(_quarantined_lines(report))
    lost = report.get("malformed_not_quarantined", 0)
    if lost:
        kept_now = report.get("malformed_quarantined_now", 0)
        parts.append(
            Text(
                f"malformed in the API and not in the quarantine: {lost}"
                + (f", {kept_now} quarantined by this repair" if kept_now else ""),
                style="green" if kept_now == lost else "bold red",
            )
        )
    window = report.get("window", {})
    verdict = (
        Text(f"complete: {window.get('from')} → {window.get('until')}", style="bold green")
        if report.get("complete")
        else Text("incomplete: run `poller verify --repair` with the same range", style="bold red")
    )
    parts.append(verdict)
    return Group(*parts)


def _quarantined_lines(report: dict[str, Any]) -> Text:
    """Alerts kept in the quarantine instead of the archive: not missing, each with why."""
    count = report["quarantined_count"]
    shown = report.get("quarantined_alerts", [])
    now = report.get("quarantined_now", 0)
    lines = [
        f"quarantined, not archived ({count}"
        + (f", {now} by this repair" if now else "")
        + "; kept under _poller/quarantine/ with the reason, not missing):"
    ]
    lines += [f"  {q['id']}: {q['reason']}: {q['detail']}" for q in shown]
    if count > len(shown):
        lines.append(f"  … and {count - len(shown)} more")
    return Text("\n".join(lines), style="yellow")


def _dismissals_cell(day: dict[str, Any]) -> Text:
    missing = day.get("dismissals_missing", 0)
    return Text(str(missing), style="bold red" if missing else "")


def _day_has_news(day: dict[str, Any]) -> bool:
    return (
        any(day["missing"].values())
        or any(day["unknown"].values())
        or bool(day.get("dismissals_missing"))
        or bool(day.get("quarantined"))
    )
