"""Metric definitions, always on an injected registry (tests build a fresh CollectorRegistry each)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

API_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ApiMetrics:
    """What the Machines API client counts: every call by endpoint and answer, its duration, its retries."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "flywatch_api_requests",
            "Machines API requests, by endpoint (OpenAPI operationId) and HTTP code (or error, timeout).",
            ["endpoint", "code"],
            registry=registry,
        )
        self.duration = Histogram(
            "flywatch_api_request_duration_seconds",
            "Time from sending a Machines API request to its answer.",
            ["endpoint"],
            buckets=API_LATENCY_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "flywatch_api_retries",
            "Machines API requests retried, by endpoint and reason (429, 5xx, timeout, connection).",
            ["endpoint", "reason"],
            registry=registry,
        )
