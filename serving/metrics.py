"""Prometheus metrics of one server (its own registry, so servers in one process stay apart),
exposed as text at TF Serving's `/monitoring/prometheus/metrics` on the REST port. With several
gRPC processes (prometheus-client's multiprocess mode, PROMETHEUS_MULTIPROC_DIR set before it
is imported), the values are summed over the processes."""

import os
import threading
import time
from contextlib import contextmanager

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from serving.config import METRICS_ENV

METRICS_PATH = "/monitoring/prometheus/metrics"
CONTENT_TYPE = CONTENT_TYPE_LATEST
# Request latency buckets, seconds: sub-millisecond resolution where this server lives.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class ServingMetrics:
    """Requests by model, version, signature, API and status; loads; in-flight; batch sizes."""

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get(METRICS_ENV))
        if self.multiprocess and values.ValueClass is values.MutexValue:
            raise RuntimeError(f"{METRICS_ENV} was set after prometheus-client's import")
        # Multiprocess mode: values live in files the collector sums; nothing is registered.
        self.registry = None if self.multiprocess else CollectorRegistry(auto_describe=True)
        labels = ("model", "version", "signature", "api", "status")
        self.requests = Counter(
            "mtrec_serving_requests", "Predict requests answered", labels, registry=self.registry
        )
        self.latency = Histogram(
            "mtrec_serving_request_latency_seconds",
            "Predict latency inside the server, from request decoded to response built",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "mtrec_serving_requests_in_flight",
            "Requests being answered",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self._active = 0  # requests being answered (the gauge reads it; the batcher asks it)
        self._active_lock = threading.Lock()
        if not self.multiprocess:
            self.in_flight.set_function(lambda: self._active)
        self.loads = Counter(
            "mtrec_serving_model_loads",
            "Version loads, by outcome (ok, failed)",
            ("model", "outcome"),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "mtrec_serving_batch_size",
            "Rows per model call (merged requests count once)",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self._series: dict[tuple, tuple] = {}  # label values -> (counter, histogram) children

    def observe(
        self, model: str, version: str, signature: str, api: str, status: str, seconds: float
    ) -> None:
        key = (model, version, signature, api, status)
        children = self._series.get(key)
        if children is None:  # labels() costs microseconds: look each series up once
            children = (self.requests.labels(*key), self.latency.labels(*key))
            self._series[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def enter(self) -> None:
        with self._active_lock:
            self._active += 1
        if self.multiprocess:
            self.in_flight.inc()

    def leave(self) -> None:
        with self._active_lock:
            self._active -= 1
        if self.multiprocess:
            self.in_flight.dec()

    def active(self) -> int:
        """Requests being answered now (an int read: no lock needed)."""
        return self._active

    @contextmanager
    def in_flight_request(self):
        self.enter()
        try:
            yield time.perf_counter()
        finally:
            self.leave()

    def on_load(self, model: str, version: int, ok: bool) -> None:
        self.loads.labels(model, "ok" if ok else "failed").inc()

    def on_batch(self, rows: int) -> None:
        self.batch_size.observe(rows)

    def text(self) -> bytes:
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
