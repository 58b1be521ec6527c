"""Prometheus metrics of the service (``GET /metrics``), with prometheus-client.

What an operator graphs and alerts on: requests by route and status, latency histograms by
route, how many requests one forward pass answered (the micro-batcher's batch sizes), how
often a known user's ranked list came from the rank cache, which
model version is live, and reloads by outcome with the time the last swap took.

Each app has its own registry, so tests (and notebooks) can create many apps in one process.
With ``behaviorlm serve --workers N`` every worker is a process of its own; the CLI then sets
``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics`` aggregates all workers' files (prometheus-client's
multiprocess mode), whichever worker answers the scrape.
"""

from __future__ import annotations

import os

from behaviorlm.extras import missing_extra

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client import multiprocess as _multiprocess
    from prometheus_client.exposition import CONTENT_TYPE_LATEST
except ImportError as exc:  # part of the serve extra
    raise missing_extra("serve", "the service's /metrics endpoint", exc) from exc

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServiceMetrics:
    """The service's counters, histograms and gauges, and their text exposition."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.routes: set[str] = set()  # paths labelled as themselves; anything else is "other"
        r = self.registry
        self.requests = Counter("behaviorlm_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.latency = Histogram(
            "behaviorlm_request_seconds",
            "Time from request to response",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "behaviorlm_batch_size", "Requests answered by one forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.model_info = Gauge(
            "behaviorlm_model_info",
            "1 for the model version being served",
            ["version"],
            registry=r,
            multiprocess_mode="max",
        )
        self.reloads = Counter("behaviorlm_reloads", "Hot reloads by outcome", ["result"], registry=r)
        self.rank_cache = Counter(
            "behaviorlm_rank_cache_lookups", "Known users' ranked-list cache lookups by result", ["result"], registry=r
        )
        self.swap_seconds = Gauge(
            "behaviorlm_last_reload_seconds",
            "Load-and-swap time of the last successful reload",
            registry=r,
            multiprocess_mode="max",
        )

    def request(self, path: str, status: int, seconds: float) -> None:
        route = path if path in self.routes else "other"  # unmatched paths must not blow up label cardinality
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def model_loaded(self, version: str, previous: str | None) -> None:
        if previous is not None and previous != version:
            self.model_info.labels(previous).set(0)
        self.model_info.labels(version).set(1)

    def reloaded(self, ok: bool, seconds: float | None = None) -> None:
        self.reloads.labels("ok" if ok else "failed").inc()
        if ok and seconds is not None:
            self.swap_seconds.set(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """The text format; across all workers' files in multiprocess mode."""
        if os.environ.get(MULTIPROC_ENV):
            registry = CollectorRegistry()
            _multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
