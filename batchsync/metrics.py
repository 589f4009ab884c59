"""The daemon's Prometheus metrics (served at ``/metrics`` by the listener), through prometheus-client::

metrics = Metrics()
metrics.finished("mailup", "nightly", report, seconds=12.5)
metrics.failed("mailup", "inbox", seconds=0.3)
metrics.text()           # the exposition format
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from batchsync.sync import ImportReport, RunReport

DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 7200, float("inf"))


class Metrics:
    """The daemon's Prometheus counters, gauges and histograms, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        by_profile = ["profile"]
        self.runs = Counter(
            "batchsync_runs",
            "Jobs run, by profile, job and outcome",
            ["profile", "job", "outcome"],
            registry=self.registry,
        )
        self.exported = Counter("batchsync_exported_rows", "Rows exported", by_profile, registry=self.registry)
        self.imported = Counter("batchsync_imported_rows", "Inbound rows read", by_profile, registry=self.registry)
        self.rejected = Counter("batchsync_rejected_rows", "Inbound rows rejected", by_profile, registry=self.registry)
        self.quarantined = Counter(
            "batchsync_quarantined_files", "Inbound files quarantined", by_profile, registry=self.registry
        )
        self.last_success = Gauge(
            "batchsync_last_success_timestamp_seconds",
            "When a job of this kind last ran and ended well (job=nightly: the last good night)",
            ["profile", "job"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "batchsync_run_duration_seconds",
            "How long jobs took",
            ["profile", "job"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )

    def finished(self, profile: str, job: str, report: Any, seconds: float) -> None:
        imported = report.imported if isinstance(report, RunReport) else report
        exported = report.exported if isinstance(report, RunReport) else None
        outcome = "ok"
        if isinstance(imported, ImportReport):
            counts = imported.counts()
            self.imported.labels(profile).inc(counts["rows"])
            self.rejected.labels(profile).inc(counts["rejected"])
            self.quarantined.labels(profile).inc(counts["quarantined"])
            outcome = "rejected" if imported.has_rejections else outcome
        if exported is not None:
            self.exported.labels(profile).inc(exported.rows)
            outcome = "stopped" if exported.stopped else outcome
        self.runs.labels(profile, job, "skipped" if report is None else outcome).inc()
        self.duration.labels(profile, job).observe(seconds)
        if report is not None:
            self.last_success.labels(profile, job).set(time.time())

    def failed(self, profile: str, job: str, seconds: float) -> None:
        self.runs.labels(profile, job, "failed").inc()
        self.duration.labels(profile, job).observe(seconds)

    def text(self) -> bytes:
        return generate_latest(self.registry)
