"""Start the simulator by hand: ``python -m poller.simulator --alerts 500``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import timedelta

from poller.simulator.server import Faults, Simulator
from poller.timeutil import utc_now


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m poller.simulator")
    parser.add_argument("--port", type=int, default=8900)
    parser.add_argument("--alerts", type=int, default=500, help="alerts to create")
    parser.add_argument("--days", type=float, default=2.0, help="spread them over this many days")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--fault-rate",
        type=float,
        default=0.0,
        help="share of requests failing (429, 5xx, slow, dropped, truncated)",
    )
    parser.add_argument(
        "--org-limit",
        type=int,
        default=None,
        help="org-wide requests per minute before 429 (the vendor's is 200)",
    )
    parser.add_argument(
        "--ends",
        choices=("[)", "()", "[]", "(]"),
        default="[)",
        help="whether from/until are inclusive ([ ]) or exclusive (( )); the API does not say",
    )
    parser.add_argument(
        "--compress",
        choices=("gzip", "deflate", "raw-deflate"),
        default=None,
        help="behave like a gateway that compresses answers when the request asks",
    )
    args = parser.parse_args()
    faults = Faults.spread(
        args.fault_rate, org_limit_per_minute=args.org_limit, compress=args.compress
    )
    sim = Simulator(
        seed=args.seed,
        port=args.port,
        faults=faults,
        from_inclusive=args.ends[0] == "[",
        until_inclusive=args.ends[1] == "]",
    )
    now = utc_now()
    sim.generate(args.alerts, now - timedelta(days=args.days), now)
    sim.start()
    sys.stdout.write(json.dumps({"alerts": args.alerts, **sim.environment()}) + "\n")
    sys.stdout.flush()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
