"""`make bench`: poller measured side by side with the S3 server's ceiling and with the old
receiver's approach, on this machine, in one run. Figures only: nothing here asserts a time.

    python bench/benchmark.py [--rounds 3] [--json bench/last-run.json]

Against the Threat Stack simulator and a moto S3 server process (one for the whole run):

  (a) ceiling   raw concurrent put_object (16 threads, poller's client settings) of the same
                number and sizes of objects poller writes, to the same server
  (b) poller    a first `poller sync` over 5,000 alerts (every round) and 20,000 (once)
  (c) seed      the old receiver's way on the same alerts: per alert one signed API GET and
                two serial PUTs, each through a new boto3 client
  (d) counts    API requests per alert, S3 requests per new and per re-read alert, an idle cycle
  (e) idle      `poller sync` with nothing new: wall time and CPU, interpreter start included
  (f) memory    peak RSS of a 5,000- and a 50,000-alert `poller backfill`
  (g) catch-up  20,000 alerts under the simulator's 200/min organisation limit with the
                default budget: time to finish, the most requests in any 60 s
  (h) tables    `poller tables` over 3 days of 10,000 alerts a day (rows/s, peak RSS, S3
                requests per alert), then `poller query` over a month of parts (the built
                days' parts copied to 30 days): a filter on one host and a count by severity,
                with the cache cold and warm. ``--only-tables`` runs just this;
                ``--tables-days 30`` builds the whole month (seeding it takes ~30 min here)

(a), (b) and (c) alternate within each round; medians and ranges are printed and written as
JSON. Rate limits are off except in (g).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import boto3
import mohawk
import requests
from botocore.config import Config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from poller.archive.records import Alert, Layout, classify, json_body, webhook_record  # noqa: E402
from poller.archive.state import CheckpointStore  # noqa: E402
from poller.archive.store import S3ObjectStore  # noqa: E402
from poller.simulator import Faults, Simulator  # noqa: E402
from poller.simulator.alerts import AlertFactory  # noqa: E402
from poller.timeutil import utc_now  # noqa: E402

AWS = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}
# Runs `poller` and writes its own peak RSS (KiB) and CPU seconds where $BENCH_USAGE says.
# Peak RSS is VmHWM of /proc/self/status: getrusage's ru_maxrss survives fork and exec on
# Linux, so a child would report the benchmark's own (larger) peak.
WRAPPER = (
    "import atexit, os, resource, sys\n"
    "def usage():\n"
    "    u = resource.getrusage(resource.RUSAGE_SELF)\n"
    "    status = open('/proc/self/status').read().splitlines()\n"
    "    hwm = next(int(line.split()[1]) for line in status if line.startswith('VmHWM'))\n"
    "    open(os.environ['BENCH_USAGE'], 'w').write(f'{hwm} {u.ru_utime + u.ru_stime}')\n"
    "atexit.register(usage)\n"
    "from poller.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def start_moto() -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    for line in process.stdout:
        match = re.search(r"Running on (http://127\.0\.0\.1:\d+)", line)
        if match:
            # Keep draining its request log, or the pipe fills and the server stalls.
            threading.Thread(
                target=lambda: process.stdout and process.stdout.read(), daemon=True
            ).start()
            return process, match.group(1)
    raise RuntimeError("moto server did not start")


class Bench:
    def __init__(self, moto_url: str) -> None:
        self.url = moto_url
        self.s3 = boto3.client(
            "s3",
            endpoint_url=moto_url,
            region_name="us-east-1",
            aws_access_key_id="x",
            aws_secret_access_key="x",
        )
        self.buckets = 0

    def bucket(self) -> str:
        self.buckets += 1
        name = f"bench-{self.buckets:03d}"
        self.s3.create_bucket(Bucket=name)
        return name

    def env(self, sim: Simulator, bucket: str, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("POLLER_", "THREATSTACK_"))}
        env.update(AWS)
        env.update(sim.environment())
        env.update(
            {
                "TS_AWS_S3_BUCKET": bucket,
                "AWS_ENDPOINT_URL_S3": self.url,
                "POLLER_LOG__LEVEL": "warning",
                "POLLER_THREATSTACK__REQUESTS_PER_MINUTE": "100000",
            }
        )
        env.update(extra)
        return env

    def poller_rows(self, args: list[str], env: dict[str, str]) -> dict[str, Any]:
        """Run `poller query ...`: its rows, wall time and peak RSS (no summary line)."""
        with tempfile.NamedTemporaryFile() as usage:
            started = time.monotonic()
            result = subprocess.run(
                [sys.executable, "-c", WRAPPER, *args],
                env={**env, "BENCH_USAGE": usage.name},
                capture_output=True,
                text=True,
                check=False,
                cwd=ROOT,
            )
            wall = time.monotonic() - started
            rss_kib, _cpu = Path(usage.name).read_text().split()
        if result.returncode != 0:
            raise SystemExit(f"poller {args} failed: {result.stderr[-2000:]}")
        rows = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
        return {"rows": rows, "wall_s": wall, "rss_mib": int(rss_kib) / 1024}

    def poller(self, args: list[str], env: dict[str, str]) -> dict[str, Any]:
        """Run `poller ARGS`; its summary plus wall time, peak RSS and CPU of the process."""
        with tempfile.NamedTemporaryFile() as usage:
            started = time.monotonic()
            result = subprocess.run(
                [sys.executable, "-c", WRAPPER, *args],
                env={**env, "BENCH_USAGE": usage.name},
                capture_output=True,
                text=True,
                check=False,
                cwd=ROOT,
            )
            wall = time.monotonic() - started
            rss_kib, cpu = Path(usage.name).read_text().split()
        if result.returncode != 0:
            raise SystemExit(f"poller {args} failed: {result.stderr[-2000:]}")
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        return {**summary, "wall_s": wall, "rss_mib": int(rss_kib) / 1024, "cpu_s": float(cpu)}

    def ceiling(self, bodies: list[bytes]) -> float:
        """Seconds for 16 threads to PUT ``bodies`` create-only, as poller's client is set."""
        bucket = self.bucket()
        client = boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="x",
            aws_secret_access_key="x",
            config=Config(retries={"mode": "standard", "max_attempts": 8}, max_pool_connections=18),
        )

        def put(item: tuple[int, bytes]) -> None:
            client.put_object(
                Bucket=bucket,
                Key=f"k/{item[0]:07d}",
                Body=item[1],
                ContentType="application/json",
                IfNoneMatch="*",
            )

        started = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(put, enumerate(bodies)))
        return time.monotonic() - started

    def seed(self, sim: Simulator, alerts: list[Alert]) -> float:
        """Seconds for the old receiver's way: per alert a signed GET of its detail, then two
        serial PUTs, each with a new boto3 client (what threatstack-to-s3 did per webhook)."""
        bucket = self.bucket()
        creds = sim.credentials
        layout = Layout()
        session = requests.Session()
        started = time.monotonic()
        for alert in alerts:
            url = f"{sim.base_url}/v2/alerts/{alert.id}"
            sender = mohawk.Sender(
                {"id": creds.user_id, "key": creds.api_key, "algorithm": "sha256"},
                url,
                "GET",
                always_hash_content=False,
                ext=creds.org_id,
            )
            detail = session.get(url, headers={"Authorization": sender.request_header}, timeout=30)
            detail.raise_for_status()
            for key, body in (
                (layout.alert_key(alert.id), detail.content),
                (
                    layout.webhook_key(alert.id, alert.created),
                    json_body(webhook_record(alert, creds.org_id)),
                ),
            ):
                client = boto3.client(
                    "s3",
                    endpoint_url=self.url,
                    region_name="us-east-1",
                    aws_access_key_id="x",
                    aws_secret_access_key="x",
                )
                client.put_object(Bucket=bucket, Key=key, Body=body)
        return time.monotonic() - started


def bodies_of(sim: Simulator) -> list[bytes]:
    out = []
    for sim_alert in sim.alerts:
        item = classify(sim_alert.doc)
        if isinstance(item, Alert):
            out.append(json_body(item.raw))
            out.append(json_body(webhook_record(item, sim.credentials.org_id)))
    return out


def median_range(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def timed(label: str, fn: Callable[[], Any]) -> Any:
    print(f"  … {label}", file=sys.stderr, flush=True)
    return fn()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--small", type=int, default=5_000)
    parser.add_argument("--large", type=int, default=20_000)
    parser.add_argument("--memory-large", type=int, default=50_000)
    parser.add_argument("--seed-alerts", type=int, default=200)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "last-run.json")
    parser.add_argument(
        "--only-memory", action="store_true", help="only (f): the two backfills' peak RSS"
    )
    parser.add_argument("--only-tables", action="store_true", help="only (h): tables and query")
    parser.add_argument("--tables-days", type=int, default=3)
    parser.add_argument("--tables-per-day", type=int, default=10_000)
    args = parser.parse_args()
    if args.only_memory:
        memory_only(args)
        return
    if args.only_tables:
        moto, url = start_moto()
        try:
            print_tables(tables_bench(Bench(url), args.tables_days, args.tables_per_day))
        finally:
            moto.terminate()
        return
    started = time.monotonic()
    moto, url = start_moto()
    bench = Bench(url)
    results: dict[str, Any] = {"machine": os.uname().nodename, "cpus": os.cpu_count()}
    try:
        now = utc_now()
        first_run = {
            "POLLER_SYNC__FIRST_RUN_SINCE": "4d",
            "POLLER_SYNC__LOOKBACK_SECONDS": "345600",
        }
        with Simulator(seed=11) as sim:
            sim.generate(args.small, now - timedelta(days=3), now - timedelta(minutes=5))
            bodies = bodies_of(sim)
            seed_alerts = [
                a
                for a in (classify(s.doc) for s in sim.alerts[: args.seed_alerts])
                if isinstance(a, Alert)
            ]
            ceil_s, poll_s, seed_s, runs = [], [], [], []
            for round_number in range(args.rounds):
                print(f"round {round_number + 1}/{args.rounds}", file=sys.stderr, flush=True)
                steps = [
                    ("ceiling", lambda: ceil_s.append(bench.ceiling(bodies))),
                    (
                        "poller",
                        lambda: runs.append(
                            bench.poller(["sync"], bench.env(sim, bench.bucket(), **first_run))
                        ),
                    ),
                    ("seed", lambda: seed_s.append(bench.seed(sim, seed_alerts))),
                ]
                for label, step in steps[round_number % 3 :] + steps[: round_number % 3]:
                    timed(label, step)
            poll_s = [r["wall_s"] for r in runs]
            n = args.small
            results["small"] = {
                "alerts": n,
                "ceiling_alerts_per_s": median_range([n / s for s in ceil_s]),
                "poller_alerts_per_s": median_range([n / s for s in poll_s]),
                "seed_alerts_per_s": median_range([len(seed_alerts) / s for s in seed_s]),
                "poller_rss_mib": median_range([r["rss_mib"] for r in runs]),
            }
            # (d) counts: a first run, a re-read of all of it, an idle cycle.
            bucket = bench.bucket()
            env = bench.env(sim, bucket, **first_run)
            first = bench.poller(["sync"], env)
            # The re-read in one chunk, as the idle cycle: the difference is the alerts' cost.
            reread = bench.poller(
                ["sync"], {**env, "POLLER_SYNC__MAX_WINDOW_SECONDS": str(5 * 86400)}
            )
            idle_env = bench.env(sim, bucket, POLLER_SYNC__LOOKBACK_SECONDS="900")
            bench.poller(["sync"], idle_env)  # the watermark catches up with the clock
            idles = [bench.poller(["sync"], idle_env) for _ in range(5)]
            idle_s3 = idles[0]["s3_requests"]
            results["counts"] = {
                "api_per_alert": first["api_requests"] / n,
                "s3_per_new_alert": first["s3_requests"] / first["archived"],
                "s3_per_reread_alert": (reread["s3_requests"] - idle_s3) / reread["listed"],
                "reread_listed": reread["listed"],
                "idle_api": idles[0]["api_requests"],
                "idle_s3": idle_s3,
            }
            results["idle"] = {
                "wall_s": median_range([r["wall_s"] for r in idles]),
                "cpu_s": median_range([r["cpu_s"] for r in idles]),
            }

        with Simulator(seed=12) as sim:
            sim.generate(args.large, now - timedelta(days=3), now - timedelta(minutes=5))
            bodies = bodies_of(sim)
            large_ceiling = timed("ceiling, large", lambda: bench.ceiling(bodies))
            large = timed(
                "poller, large",
                lambda: bench.poller(["sync"], bench.env(sim, bench.bucket(), **first_run)),
            )
            results["large"] = {
                "alerts": args.large,
                "ceiling_alerts_per_s": args.large / large_ceiling,
                "poller_alerts_per_s": args.large / large["wall_s"],
                "poller_rss_mib": large["rss_mib"],
            }

        memory = {}
        for count in (args.small, args.memory_large):
            with Simulator(seed=13) as sim:
                sim.generate(count, now - timedelta(days=30), now - timedelta(minutes=5))
                run = timed(
                    f"backfill {count}",
                    lambda sim=sim: bench.poller(
                        ["backfill", "--since", "31d"], bench.env(sim, bench.bucket())
                    ),
                )
                memory[str(count)] = {
                    "rss_mib": run["rss_mib"],
                    "wall_s": run["wall_s"],
                    "alerts_per_s": count / run["wall_s"],
                }
        results["memory"] = memory

        with Simulator(seed=14, faults=Faults(org_limit_per_minute=200)) as sim:
            sim.generate(args.large, now - timedelta(days=30), now - timedelta(minutes=5))
            env = bench.env(sim, bench.bucket(), POLLER_SYNC__FIRST_RUN_SINCE="31d")
            del env["POLLER_THREATSTACK__REQUESTS_PER_MINUTE"]  # the default budget, 100/min
            run = timed("catch-up under the org limit", lambda: bench.poller(["sync"], env))
            results["org_limited"] = {
                "alerts": args.large,
                "wall_s": run["wall_s"],
                "api_requests": run["api_requests"],
                "max_requests_in_60s": sim.max_requests_in_any_window(60.0),
                "answered_429": sim.org_limited,
            }
        results["tables"] = tables_bench(bench, args.tables_days, args.tables_per_day)
    finally:
        moto.terminate()
    results["bench_wall_s"] = time.monotonic() - started
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    if "tables" in results:
        print_tables(results["tables"])


MONTH = 30
HOST_SQL = "SELECT count(*) FROM alerts_latest WHERE agent_id = '{agent}' AND severity = 1"
SEVERITY_SQL = "SELECT severity, count(*) FROM alerts GROUP BY severity ORDER BY severity"


def tables_bench(bench: Bench, days: int, per_day: int) -> dict[str, Any]:
    """(h): seed ``days`` closed days of ``per_day`` archived alerts (both records, written
    directly, 16 threads), run `poller tables`, copy the parts to a month, query it."""
    from datetime import UTC, datetime

    bucket = bench.bucket()
    layout = Layout()
    factory = AlertFactory(seed=21)
    first = datetime(2026, 10, 1, tzinfo=UTC)
    client = boto3.client(
        "s3",
        endpoint_url=bench.url,
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="x",
        config=Config(max_pool_connections=20),
    )

    def put(item: tuple[str, bytes]) -> None:
        client.put_object(Bucket=bucket, Key=item[0], Body=item[1], IfNoneMatch="*")

    started = time.monotonic()
    for day in range(days):
        objects: list[tuple[str, bytes]] = []
        start = first + timedelta(days=day)
        for doc, _, _ in factory.spread(per_day, start, start + timedelta(days=1), 0.3):
            alert = classify(doc)
            assert isinstance(alert, Alert)
            objects.append((layout.alert_key(alert.id), json_body(doc)))
            objects.append(
                (layout.webhook_key(alert.id, alert.created), json_body(webhook_record(alert, "o")))
            )
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(put, objects))
    seed_s = time.monotonic() - started
    print(f"  seeded {days * per_day} alerts in {seed_s:.0f} s", flush=True)
    watermark = first + timedelta(days=MONTH + 1)
    checkpoints = CheckpointStore(S3ObjectStore(client, bucket), layout)
    checkpoints.commit(checkpoints.load(), watermark, {}, "bench", "sync", watermark)
    with Simulator(seed=21) as sim:  # only for the environment's credentials
        env = bench.env(sim, bucket)
    built = timed("poller tables", lambda: bench.poller(["tables", "--since", "2026-10-01"], env))
    # A month of parts: the built days' parts copied (server side) to the other days.
    listing = client.list_objects_v2(Bucket=bucket, Prefix="tables/").get("Contents", [])
    parts = [item["Key"] for item in listing]
    for day in range(days, MONTH):
        source_day = (first + timedelta(days=day % days)).date().isoformat()
        target_day = (first + timedelta(days=day)).date().isoformat()
        for key in parts:
            if f"date={source_day}/" in key:
                client.copy_object(
                    Bucket=bucket,
                    Key=key.replace(f"date={source_day}/", f"date={target_day}/"),
                    CopySource={"Bucket": bucket, "Key": key},
                )
    queries: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as cache:
        query_env = {**env, "POLLER_TABLES__CACHE_DIR": cache}
        span = ["--since", "2026-10-01", "--until", "2026-10-30", "--json"]
        host = HOST_SQL.format(agent=factory.agents[0])
        for label, sql in (("host_cold", host), ("host_warm", host), ("severity", SEVERITY_SQL)):
            run = bench.poller_rows(["query", sql, *span], query_env)
            queries[label] = {"wall_s": run["wall_s"], "rss_mib": run["rss_mib"]}
    alerts = built["alert_rows"]
    return {
        "days": days,
        "alerts": alerts,
        "seed_s": seed_s,
        "tables_wall_s": built["wall_s"],
        "rows_per_s": alerts / built["wall_s"],
        "rss_mib": built["rss_mib"],
        "s3_per_alert": built["s3_requests"] / max(alerts, 1),
        "parts": len(parts),
        "month_alerts": alerts * MONTH // days,
        "queries": queries,
    }


def print_tables(t: dict[str, Any]) -> None:
    q = t["queries"]
    lines = [
        (
            f"(h) poller tables, {t['days']} days, {t['alerts']} alerts: rows/s",
            f"{t['rows_per_s']:.0f}",
        ),
        ("    peak RSS MiB", f"{t['rss_mib']:.1f}"),
        ("    S3 requests per alert", f"{t['s3_per_alert']:.3f}"),
        (
            f"    query, a month ({t['month_alerts']} alerts), one host, cold cache s",
            f"{q['host_cold']['wall_s']:.1f}",
        ),
        ("    same, warm cache s", f"{q['host_warm']['wall_s']:.1f}"),
        ("    count by severity, warm cache s", f"{q['severity']['wall_s']:.1f}"),
        ("    query peak RSS MiB", f"{q['severity']['rss_mib']:.1f}"),
    ]
    for label, value in lines:
        print(f"{label:<70}{value:>10}")


def memory_only(args: argparse.Namespace) -> None:
    moto, url = start_moto()
    bench = Bench(url)
    now = utc_now()
    try:
        for count in (args.small, args.memory_large):
            with Simulator(seed=13) as sim:
                sim.generate(count, now - timedelta(days=30), now - timedelta(minutes=5))
                run = bench.poller(["backfill", "--since", "31d"], bench.env(sim, bench.bucket()))
                print(
                    f"(f) backfill {count} alerts: peak RSS {run['rss_mib']:.1f} MiB,"
                    f" {count / run['wall_s']:.0f} alerts/s"
                )
    finally:
        moto.terminate()


def print_table(r: dict[str, Any]) -> None:
    small, large, counts = r["small"], r["large"], r["counts"]

    def mr(d: dict[str, float], fmt: str = "{:.0f}") -> str:
        return f"{fmt.format(d['median'])} ({fmt.format(d['min'])}-{fmt.format(d['max'])})"

    ratio = small["poller_alerts_per_s"]["median"] / small["ceiling_alerts_per_s"]["median"]
    vs_seed = small["poller_alerts_per_s"]["median"] / small["seed_alerts_per_s"]["median"]
    lines = [
        ("", "measured", "target"),
        (f"(a) ceiling, {small['alerts']} alerts, alerts/s", mr(small["ceiling_alerts_per_s"]), ""),
        (f"(b) poller, {small['alerts']} alerts, alerts/s", mr(small["poller_alerts_per_s"]), ""),
        ("    poller / ceiling", f"{ratio:.2f}", ">= 0.8"),
        (
            f"(a) ceiling, {large['alerts']} alerts, alerts/s",
            f"{large['ceiling_alerts_per_s']:.0f}",
            "",
        ),
        (
            f"(b) poller, {large['alerts']} alerts, alerts/s",
            f"{large['poller_alerts_per_s']:.0f}",
            "",
        ),
        (
            "    poller / ceiling",
            f"{large['poller_alerts_per_s'] / large['ceiling_alerts_per_s']:.2f}",
            ">= 0.8",
        ),
        ("(c) seed's approach, alerts/s", mr(small["seed_alerts_per_s"], "{:.1f}"), ""),
        ("    poller / seed", f"{vs_seed:.1f}x", ">= 3x"),
        ("(d) API requests per alert", f"{counts['api_per_alert']:.4f}", "<= 0.011"),
        ("    S3 requests per new alert", f"{counts['s3_per_new_alert']:.4f}", "<= 2.02"),
        (
            f"    S3 requests per re-read alert ({counts['reread_listed']})",
            f"{counts['s3_per_reread_alert']:.4f}",
            "0",
        ),
        (
            "    idle cycle: API / S3 requests",
            f"{counts['idle_api']} / {counts['idle_s3']}",
            "a handful",
        ),
        ("(e) idle sync wall s", mr(r["idle"]["wall_s"], "{:.2f}"), "~1"),
        ("    idle sync CPU s", mr(r["idle"]["cpu_s"], "{:.2f}"), ""),
    ]
    for count, m in r["memory"].items():
        lines.append((f"(f) backfill {count} alerts: peak RSS MiB", f"{m['rss_mib']:.1f}", ""))
    small_rss, large_rss = (m["rss_mib"] for m in r["memory"].values())
    lines.append(
        ("    RSS growth 50k vs 5k", f"{(large_rss / small_rss - 1) * 100:+.1f}%", "<= 10%")
    )
    g = r["org_limited"]
    lines += [
        (f"(g) {g['alerts']} alerts at 200/min org limit: minutes", f"{g['wall_s'] / 60:.1f}", ""),
        ("    most requests in any 60 s", str(g["max_requests_in_60s"]), "<= 100"),
        ("    answered 429 by the org limit", str(g["answered_429"]), "0"),
        ("whole benchmark, minutes", f"{r['bench_wall_s'] / 60:.1f}", "< 20"),
    ]
    width = max(len(a) for a, _, _ in lines)
    for label, value, target in lines:
        print(f"{label:<{width}}  {value:>22}  {target}")


if __name__ == "__main__":
    main()
