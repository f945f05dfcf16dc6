"""Prometheus metrics of a server (`GET /metrics`), in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip


class Metrics:
    """The server's counters, gauges and histograms (names prefixed `lightlong_`)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "lightlong_requests", "Requests finished, by how they ended", ["status"], registry=r
        )
        self.prompt_tokens = Counter(
            "lightlong_prompt_tokens", "Prompt tokens of admitted requests", registry=r
        )
        self.prefill_tokens = Counter(
            "lightlong_prefill_tokens",
            "Prompt tokens run through the model (prefix-cache hits excluded)",
            registry=r,
        )
        self.generation_tokens = Counter(
            "lightlong_generation_tokens", "Tokens generated", registry=r
        )
        self.prefix_queries = Counter(
            "lightlong_prefix_cache_queries", "Prefix-cache lookups (one per request)", registry=r
        )
        self.prefix_hits = Counter(
            "lightlong_prefix_cache_hits", "Prefix-cache lookups that restored a prefix", registry=r
        )
        self.prefix_hit_tokens = Counter(
            "lightlong_prefix_cache_hit_tokens", "Prompt tokens restored from the prefix cache",
            registry=r,
        )  # fmt: skip
        self.prefix_bytes = Gauge(
            "lightlong_prefix_cache_bytes", "Bytes held by prefix snapshots", registry=r
        )
        self.running = Gauge("lightlong_num_requests_running", "Requests decoding", registry=r)
        self.waiting = Gauge(
            "lightlong_num_requests_waiting", "Requests waiting for rows or prefill", registry=r
        )
        self.ttft = Histogram(
            "lightlong_time_to_first_token_seconds", "From arrival to the first token",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "lightlong_inter_token_latency_seconds", "Between two tokens of one choice",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "lightlong_e2e_request_latency_seconds", "From arrival to the last token",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
