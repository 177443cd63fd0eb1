"""The local server's request metrics, in a registry of its own, exposed as Prometheus text on the
monitoring config's path (``serving/monitoring.config``) by the REST API.

- ``imgpipe_serving_requests_total{api, model, code}``: requests answered, by API (Predict,
  Classify, GetModelMetadata, RestPredict), model name and gRPC status code name;
- ``imgpipe_serving_latency_seconds{api, model}``: a histogram of the time to answer
  (``_bucket``, ``_count`` and ``_sum``).
"""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder


class Metrics:
    """Request counts and latencies of one server (never the process-wide default registry, so
    two servers in one process keep their own counts)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "imgpipe_serving_requests",
            "Requests answered, by API, model and gRPC status code.",
            ["api", "model", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "imgpipe_serving_latency_seconds",
            "Time to answer a request, by API and model.",
            ["api", "model"],
            registry=self.registry,
        )

    def record(self, api: str, model: str, code: grpc.StatusCode, seconds: float) -> None:
        self.requests.labels(api, model, code.name).inc()
        self.latency.labels(api, model).observe(seconds)

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The metrics in the text format the ``Accept`` header asks for (Prometheus text by
        default, OpenMetrics on request), and its content type."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type
