"""Prometheus metrics of the service, in a registry of its own (one per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .batcher import Batcher, BatchRecord

_ROUTES = ("/v1/images/generations", "/generate-image", "/v1/models", "/health/live", "/health/ready", "/metrics")
_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("ortdiffusion_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.queue_seconds = Histogram("ortdiffusion_queue_seconds", "time a request waited for the worker",
                                       buckets=_SECONDS, registry=self.registry)
        self.compute_seconds = Histogram("ortdiffusion_compute_seconds", "time the pipeline ran for a request's batch",
                                         buckets=_SECONDS, registry=self.registry)
        self.batch_images = Histogram("ortdiffusion_batch_images", "images per batch the worker ran",
                                      buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32), registry=self.registry)
        self.queue_depth = Gauge("ortdiffusion_queue_depth", "requests waiting", registry=self.registry)
        self.in_flight = Gauge("ortdiffusion_in_flight", "requests being computed", registry=self.registry)

    def bind(self, batcher: Batcher) -> None:
        self.queue_depth.set_function(lambda: batcher.queue_depth)
        self.in_flight.set_function(lambda: batcher.in_flight)

    def observe_batch(self, record: BatchRecord) -> None:
        self.batch_images.observe(record.images)

    def count(self, path: str, status: int) -> None:
        route = path if path in _ROUTES else ("/v1/images/files" if path.startswith("/v1/images/files/") else "other")
        self.requests.labels(route=route, status=str(status)).inc()
