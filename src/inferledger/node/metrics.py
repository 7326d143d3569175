"""Prometheus metrics of one node (its own registry, so tests can run several nodes)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.tokens_generated = Counter(
            "inferledger_tokens_generated", "Tokens streamed to clients", registry=self.registry
        )
        self.sessions_active = Gauge(
            "inferledger_sessions_active", "Sessions with a live connection", registry=self.registry
        )
        self.time_to_first_token = Histogram(
            "inferledger_time_to_first_token_seconds",
            "From prompt received to first token sent",
            registry=self.registry,
        )
        self.receipt_round_trip = Histogram(
            "inferledger_receipt_round_trip_seconds",
            "From receipt request sent to valid receipt stored",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
            registry=self.registry,
        )
        self.errors = Counter(
            "inferledger_errors", "Error frames sent, by code", ["code"], registry=self.registry
        )
        self.generation_queue = Gauge(
            "inferledger_generation_queue",
            "Prompts waiting for a free generation slot",
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
