"""``poller demo``: the real daemon against a local Threat Stack simulator and a local S3
server, with nothing to configure; a live view while it runs, a tour of the archive after.

moto is an optional extra (``pip install 'poller[demo]'``); without it the demo says so in
one line and exits 2. The daemon is exactly ``poller run``'s (a cycle every interval, HTTP health
and metrics, graceful stop on Ctrl-C); only its world is local.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import secrets
import socket
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import requests
from pydantic import SecretStr
from rich.columns import Columns
from rich.console import Console
from rich.live import Live
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from poller.app import Runtime, build, local_s3_client
from poller.archive.records import Alert, Layout, classify
from poller.config import (
    HttpSettings,
    LogSettings,
    ReceiverSettings,
    S3Settings,
    Settings,
    SyncSettings,
    ThreatStackSettings,
)
from poller.serving.daemon import Daemon
from poller.simulator import Simulator
from poller.simulator.alerts import SimAlert
from poller.tables.build import TablesBuilder
from poller.tables.query import PartCache, connect, run_sql
from poller.terminal import render_rows, span
from poller.timeutil import iso_z, utc_now

BUCKET = "poller-demo"
INSTALL_HINT = (
    "poller demo needs moto's S3 server: pip install 'poller[demo]'"
    " (or: pip install 'moto[server]'), or run `make demo`"
)
MALFORMED_KINDS = ("missing_id", "slash_id", "bad_created_at")


def _free_port(preferred: int) -> int:
    """``preferred`` if it can be bound on loopback, else any free port."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", preferred))
        except OSError:
            probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class AlertWeather:
    """Keeps the simulator alive: a few new alerts a minute, every fourth one visible
    late (created minutes ago, inside the look-back), and now and then a malformed one."""

    def __init__(
        self,
        sim: Simulator,
        stop: threading.Event,
        every_seconds: float = 12.0,
        push: Callable[[SimAlert], None] | None = None,
    ):
        self._sim = sim
        self._stop = stop
        self._every = every_seconds
        self._rng = random.Random(2026)  # noqa: S311 - simulated weather, not security
        self._push = push
        self.added = 0
        self.pushed = 0
        self.dismissed = 0
        self._thread = threading.Thread(target=self._run, name="demo-alerts", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _dismiss_one(self, now: datetime) -> None:
        """An analyst dismisses an alert the daemon archived while it was active (created
        over 10 minutes ago: behind the live window), as ``POST /v2/alerts/dismiss`` would."""
        candidates = [
            a
            for a in self._sim.alerts
            if a.status == "active"
            and isinstance(a.id, str)
            and a.created < now - timedelta(minutes=10)
        ]
        if not candidates:
            return
        alert = self._rng.choice(candidates)
        reason = self._rng.choice(("MAINTENANCE", "OTHER", "BUSINESS_OP"))
        text = "handled in ticket SEC-1234" if reason == "OTHER" else None
        self._sim.dismiss([alert.id], reason, text)
        self.dismissed += 1

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            now = utc_now()
            if self.added % 3 == 0:  # the first tick, then every third
                self._dismiss_one(now)
            self.added += 1
            status = "dismissed" if self._rng.random() < 0.3 else "active"
            if self.added % 10 == 0:
                kind = MALFORMED_KINDS[(self.added // 10) % len(MALFORMED_KINDS)]
                self._sim.add_malformed(kind, now - timedelta(seconds=30))
            elif self.added % 4 == 0:
                created = now - timedelta(minutes=3)
                self._sim.add(self._sim.factory.alert(created, status), created, status, now)
            else:
                created = now - timedelta(seconds=self._rng.randint(1, 20))
                alert = self._sim.add(self._sim.factory.alert(created, status), created, status)
                if self._push is not None and self.added % 2:  # every other one also pushed
                    self._push(alert)
                    self.pushed += 1


def demo_settings(
    sim: Simulator, interval: int, port: int, token: str, since: str = "24h"
) -> Settings:
    credentials = sim.credentials
    return Settings(
        threatstack=ThreatStackSettings(
            base_url=sim.base_url,
            user_id=credentials.user_id,
            org_id=credentials.org_id,
            api_key=SecretStr(credentials.api_key),
            max_attempts=4,
            max_retry_seconds=30,
        ),
        s3=S3Settings(bucket=BUCKET, max_concurrency=8),
        # A short settle and look-back so new alerts show within a cycle or two.
        sync=SyncSettings(
            interval_seconds=interval,
            lookback_seconds=300,
            settle_seconds=5,
            first_run_since=since,
            lease_ttl_seconds=30,
            # Dismissals of archived alerts show up within a few cycles.
            revisit_days=2,
            revisit_interval_seconds=3 * interval,
        ),
        http=HttpSettings(host="127.0.0.1", port=port),
        log=LogSettings(level="WARNING"),
        receiver=ReceiverSettings(token=SecretStr(token)),  # the push path too
    )


class LiveView:
    """What the terminal shows while the daemon runs, read from the daemon's own state."""

    def __init__(self, daemon: Daemon, runtime: Runtime, weather: AlertWeather, endpoint: str):
        self.daemon = daemon
        self.runtime = runtime
        self.weather = weather
        self.endpoint = endpoint

    def _metric(self, name: str, labels: dict[str, str] | None = None) -> int:
        value = self.daemon.metrics.registry.get_sample_value(name, labels or {})
        return int(value or 0)

    def __rich__(self) -> Panel:
        cycles = Counter(
            {
                outcome: self._metric("poller_cycles_total", {"outcome": outcome})
                for outcome in ("ok", "lease_held", "failed", "stopped", "crashed")
            }
        )
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        done = ", ".join(f"{n} {name}" for name, n in cycles.items() if n) or "starting…"
        table.add_row("cycles", done)
        table.add_row(
            "alerts",
            f"{self._metric('poller_alerts_total', {'result': 'archived'})} archived · "
            f"{self._metric('poller_alerts_total', {'result': 'already_archived'})} already"
            f" archived · {self._metric('poller_alerts_total', {'result': 'quarantined'})}"
            " quarantined",
        )
        budget = self.runtime.budget
        table.add_row(
            "API requests",
            f"{self._metric('poller_api_requests_total')} in all · {len(budget.recent())}"
            f" in the last minute of a budget of {budget.per_minute}",
        )
        watermark = self.daemon.metrics.registry.get_sample_value(
            "poller_watermark_timestamp_seconds"
        )
        if watermark:
            lag = utc_now().timestamp() - watermark
            moment = utc_now() - timedelta(seconds=lag)
            table.add_row("watermark", f"{moment:%H:%M:%S} UTC · lag {span(lag)}")
        else:
            table.add_row("watermark", "none yet")
        table.add_row(
            "dismissals",
            f"{self.weather.dismissed} archived alerts dismissed since the start;"
            f" {self._metric('poller_dismissals_archived_total')} dismissal records archived",
        )
        by_push = self._metric("poller_push_alerts_total", {"outcome": "archived"})
        table.add_row(
            "new alerts",
            f"{self.weather.added} since the start (some late); {self.weather.pushed} also"
            f" pushed as webhooks, {by_push} of them archived by the push first",
        )
        port = self.daemon.http_port
        table.add_row("metrics", f"http://127.0.0.1:{port}/metrics" if port else "starting…")
        table.add_row("S3 endpoint", f"{self.endpoint}  bucket {BUCKET}")
        return Panel(table, title="poller demo · Ctrl-C stops it", border_style="blue")


def _json(document: Any) -> Syntax:
    return Syntax(json.dumps(document, indent=2, ensure_ascii=False), "json", word_wrap=True)


def tour(client: Any, endpoint: str, console: Console) -> None:
    """After the stop: the archive tree, a full record beside its webhook record, the
    quarantine with reasons, the checkpoint, and where to look further."""
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    kinds = {
        kind: sorted(k for k in keys if k.startswith(kind + "/"))
        for kind in ("alerts", "webhooks", "dismissals", "_poller")
    }
    tree = Tree(f"[bold]s3://{BUCKET}/[/] ({len(keys)} objects)")
    for kind, found in kinds.items():
        branch = tree.add(f"[bold]{kind}/[/] ({len(found)} objects)")
        shown = found if kind == "_poller" else found[:3]
        for key in shown:
            branch.add(key)
        if len(found) > len(shown):
            branch.add(f"… {len(found) - len(shown)} more")
    console.rule("[bold]The archive")
    console.print(tree)

    def body(key: str) -> Any:
        return json.loads(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())

    if kinds["alerts"]:
        full = body(kinds["alerts"][-1])
        item = classify(full)
        if isinstance(item, Alert):
            webhook_key = Layout().webhook_key(item.id, item.created)
            console.rule("[bold]One alert, as both records")
            console.print(
                Columns(
                    [
                        Panel(_json(full), title=kinds["alerts"][-1]),
                        Panel(_json(body(webhook_key)), title=webhook_key),
                    ],
                    equal=True,
                    expand=True,
                )
            )
    if kinds["dismissals"]:
        dismissal_key = kinds["dismissals"][-1]
        alert_id = dismissal_key.rsplit("/", 1)[1]
        first_key = Layout().alert_key(alert_id)
        console.rule("[bold]A later dismissal: the first record stands, the dismissal beside it")
        console.print(
            Columns(
                [
                    Panel(_json(body(first_key)), title=first_key),
                    Panel(_json(body(dismissal_key)), title=dismissal_key),
                ],
                equal=True,
                expand=True,
            )
        )
    quarantined = [k for k in kinds["_poller"] if k.startswith("_poller/quarantine/")]
    console.rule("[bold]Quarantine")
    if quarantined:
        table = Table("reason", "detail", "key")
        for key in quarantined:
            record = body(key)
            table.add_row(record.get("reason"), record.get("detail"), key)
        console.print(table)
    else:
        console.print("nothing quarantined")
    console.rule("[bold]The checkpoint")
    if "_poller/checkpoint.json" in keys:
        checkpoint = body("_poller/checkpoint.json")
        checkpoint["seen"] = f"{len(checkpoint.get('seen') or {})} ids"
        console.print(_json(checkpoint))
    console.rule("[bold]Look further")
    console.print(
        Text(
            "While a demo runs, point the real commands at it from another terminal:\n"
            f"  export AWS_ENDPOINT_URL_S3={endpoint} AWS_ACCESS_KEY_ID=demo"
            f" AWS_SECRET_ACCESS_KEY=demo TS_AWS_S3_BUCKET={BUCKET}\n"
            "  poller status      # watermark, lag, lease, last run's counts, last revisit\n"
            "  aws s3 ls --recursive s3://poller-demo/   # with the AWS CLI, if you have it\n"
            "Then read the README's quick start to point poller at your own organisation."
        )
    )


# The tour's question, asked of the demo's own closed days.
TOUR_SQL = (
    'SELECT "date", severity, count(*) AS alerts,'
    " count(*) FILTER (WHERE is_dismissed) AS dismissed"
    ' FROM alerts_latest GROUP BY "date", severity ORDER BY "date", severity'
)


def query_tour(runtime: Runtime, console: Console) -> None:
    """The query tables of the demo's closed day (yesterday), built if the daemon has not
    yet, and one ``poller query`` over them."""
    console.rule("[bold]Query tables")
    lookback = timedelta(seconds=runtime.settings.sync.lookback_seconds)
    builder = TablesBuilder(runtime.store, runtime.layout, lookback=lookback)
    builder.run(builder.plan(runtime.watermark()))  # nothing to do when the daemon did it
    with tempfile.TemporaryDirectory(prefix="poller-demo-") as folder:
        today = utc_now().date()
        fetched = PartCache(runtime.store, runtime.layout, Path(folder)).fetch(
            today - timedelta(days=2), today
        )
        if not fetched.days["alerts"]:
            console.print("no closed day yet: the tables are built once a day has closed")
            return
        con = connect(fetched.files, fetched.parts)
        answer = run_sql(con, TOUR_SQL, fetched.parts)
        con.close()
    console.print(
        Text(
            f"closed days with tables: {', '.join(fetched.days['alerts'])}\n"
            f"$ poller query --since 2d '{TOUR_SQL}'"
        )
    )
    console.print(render_rows(answer.columns, answer.rows))


def keep_archive(client: Any, directory: Path) -> int:
    """Copy every object of the demo bucket under ``directory`` (keys become paths)."""
    copied = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            target = directory / item["Key"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read())
            copied += 1
    return copied


def run_demo(alerts: int, interval: int, port: int, keep: Path | None) -> int:
    console = Console(highlight=False)
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        sys.stderr.write(INSTALL_HINT + "\n")
        return 2
    if alerts < 0 or interval < 1:
        sys.stderr.write("poller demo: --alerts must be 0 or more, --interval at least 1\n")
        return 2

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    s3_server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(0), verbose=False)
    s3_server.start()
    host, s3_port = s3_server.get_host_and_port()
    endpoint = f"http://{host}:{s3_port}"
    sim = Simulator(seed=2026).start()
    try:
        now = utc_now()
        # From yesterday's start: a whole past day, closed, for the query tables.
        start = datetime.combine(now.date() - timedelta(days=1), datetime.min.time(), now.tzinfo)
        sim.generate(alerts, start, now - timedelta(minutes=2))
        for kind in MALFORMED_KINDS[:2]:
            sim.add_malformed(kind, now - timedelta(hours=5))
        client = local_s3_client(endpoint)
        client.create_bucket(Bucket=BUCKET)
        token = secrets.token_urlsafe(16)
        settings = demo_settings(sim, interval, _free_port(port), token, iso_z(start))
        runtime = build(settings, "run", s3=client)
        daemon = Daemon(runtime, utc_now)

        def push(alert: SimAlert) -> None:
            """What Threat Stack's webhook would send for it, to the daemon's receiver."""
            if daemon.http_port is None:
                return
            webhook = {
                "id": alert.id,
                "title": alert.doc.get("title"),
                "created_at": str(int(alert.created.timestamp() * 1000)),
                "severity": str(alert.doc.get("severity")),
                "organization_id": sim.credentials.org_id,
            }
            url = f"http://127.0.0.1:{daemon.http_port}/api/v1/s3/alert/{token}"
            with contextlib.suppress(requests.RequestException):
                requests.post(url, json={"alerts": [webhook]}, timeout=5)

        weather = AlertWeather(sim, runtime.stop, push=push)
        weather.start()
        console.print(
            f"[bold]poller demo[/]: a simulated Threat Stack with {alerts} alerts since"
            f" yesterday 00:00 UTC (more arrive as it runs) at {sim.base_url}\n"
            f"S3 endpoint: {endpoint}  bucket: {BUCKET}\n"
            f"cycle every {interval}s · Ctrl-C stops it and shows what was archived"
        )
        console.file.flush()
        with Live(LiveView(daemon, runtime, weather, endpoint), console=console) as live:
            code = daemon.run()
            live.refresh()
        tour(client, endpoint, console)
        query_tour(runtime, console)
        if keep is not None:
            copied = keep_archive(client, keep)
            console.print(f"kept {copied} objects under {keep}/")
        return code
    finally:
        sim.stop()
        s3_server.stop()
