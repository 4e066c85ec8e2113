"""Prometheus metrics of the daemon, on a registry of its own (no module-level globals)."""

from __future__ import annotations

from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge

from poller.walks.sync import Summary


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.cycles = Counter(
            "poller_cycles", "Cycles run, by outcome", ["outcome"], registry=self.registry
        )
        self.alerts = Counter(
            "poller_alerts", "Alerts handled, by result", ["result"], registry=self.registry
        )
        self.api_requests = Counter(
            "poller_api_requests",
            "Threat Stack HTTP requests, retries included",
            registry=self.registry,
        )
        self.s3_requests = Counter(
            "poller_s3_requests", "S3 HTTP requests, retries included", registry=self.registry
        )
        self.last_success = Gauge(
            "poller_last_success_timestamp_seconds",
            "End of the last successful cycle",
            registry=self.registry,
        )
        self.watermark = Gauge(
            "poller_watermark_timestamp_seconds",
            "Every alert created before it is archived",
            registry=self.registry,
        )
        self.budget_used = Gauge(
            "poller_api_requests_last_minute",
            "Threat Stack requests started in the last 60 s (against the budget)",
            registry=self.registry,
        )
        self.budget = Gauge(
            "poller_api_budget_per_minute",
            "threatstack.requests_per_minute",
            registry=self.registry,
        )
        self.table_parts = Counter(
            "poller_table_parts",
            "Query-table Parquet parts written by the daemon",
            registry=self.registry,
        )
        self.tables_pending = Gauge(
            "poller_tables_pending_days",
            "Due days of query tables the daemon's last pass left for the next (its time bound)",
            registry=self.registry,
        )

        self.dismissals = Counter(
            "poller_dismissals_archived",
            "Dismissal records written (P/dismissals/...), by the revisit or a repair",
            registry=self.registry,
        )
        self.revisit_lag = Gauge(
            "poller_revisit_lag_seconds",
            "Seconds since the last finished revisit started (dismissals before it, of alerts"
            " created within sync.revisit_days, are archived)",
            registry=self.registry,
        )

    def observe(self, summary: Summary, outcome: str, now: datetime) -> None:
        self.cycles.labels(outcome).inc()
        self.alerts.labels("archived").inc(summary.archived)
        self.alerts.labels("already_archived").inc(summary.already_archived)
        self.alerts.labels("quarantined").inc(summary.quarantined)
        self.api_requests.inc(summary.api_requests)
        self.s3_requests.inc(summary.s3_requests)
        if outcome == "ok":
            self.last_success.set(now.timestamp())
        if summary.watermark:
            self.watermark.set(datetime.fromisoformat(summary.watermark).timestamp())
        self.dismissals.inc(summary.dismissals_archived)
        started = (summary.revisit or {}).get("last_started_at")
        if isinstance(started, str):
            lag = now - datetime.fromisoformat(started.replace("Z", "+00:00"))
            self.revisit_lag.set(lag.total_seconds())
