"""Prometheus metrics of the server. Request counts are labelled by route, never by the raw URL: a client
probing random paths would otherwise create a new series per path and grow the server's memory."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

UNKNOWN_ROUTE = "other"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("slm_requests_total", "HTTP requests", ["endpoint", "status"], registry=r)
        self.tokens = Counter("slm_generated_tokens_total", "tokens generated", ["model_type"], registry=r)
        self.latency = Histogram("slm_request_latency_seconds", "generation request latency", ["endpoint"],
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)
        self.queue_depth = Gauge("slm_queue_depth", "requests waiting for a batch slot", registry=r)
        self.batch_size = Gauge("slm_batch_size", "sequences in the last decode step", ["model_type"], registry=r)
        self.finish = Counter("slm_finished_total", "finished generations by reason", ["reason"], registry=r)

    def request(self, route: str | None, status: int) -> None:
        """Count a request under its route template (``/predict``), or under "other" if no route matched."""
        self.requests.labels(route or UNKNOWN_ROUTE, str(status)).inc()

    def generated(self, model_type: str, endpoint: str, tokens: int, seconds: float) -> None:
        self.tokens.labels(model_type).inc(tokens)
        self.latency.labels(endpoint).observe(seconds)

    def batch(self, name: str, n: int) -> None:
        self.batch_size.labels(name).set(n)

    def queue(self, n: int) -> None:
        self.queue_depth.set(n)

    def finished(self, reason: str | None) -> None:
        self.finish.labels(reason or "unknown").inc()
