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

        self.checkpoints = Counter(
            "inferledger_checkpoints",
            "Checkpoints entering each state (proved, receipted, submitted, settled, ...)",
            ["state"],
            registry=self.registry,
        )
        self.proof_seconds = Histogram(
            "inferledger_proof_seconds",
            "Time to prove and sign one checkpoint, by prover",
            ["prover"],
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
            registry=self.registry,
        )
        self.proof_bytes = Histogram(
            "inferledger_proof_bytes",
            "Size of one stored proof bundle",
            buckets=(512, 1024, 2048, 4096, 8192, 16384, 65536),
            registry=self.registry,
        )
        self.prover_failures = Counter(
            "inferledger_prover_failures",
            "Checkpoints that fell back to an unproven commitment because the prover failed",
            registry=self.registry,
        )
        self.settlement_seconds = Histogram(
            "inferledger_settlement_seconds",
            "From settlement scheduled to paid out on chain",
            buckets=(0.1, 0.5, 1, 5, 30, 60, 300, 1800),
            registry=self.registry,
        )
        self.settlements = Counter(
            "inferledger_settlements",
            "Sessions settled, by how (complete, finalize, by_others) and trigger",
            ["how", "reason"],
            registry=self.registry,
        )
        self.tx_failures = Counter(
            "inferledger_tx_failures",
            "Failed transaction attempts, by action and kind of error",
            ["action", "error"],
            registry=self.registry,
        )
        self.exposure_released = Counter(
            "inferledger_exposure_released",
            "Settled sessions whose paid amount the node released from its exposure cap",
            registry=self.registry,
        )

        self.chain_up = Gauge(
            "inferledger_chain_up",
            "1 while the chain answers and mines the node's transactions, else 0",
            registry=self.registry,
        )
        self.chain_problems = Counter(
            "inferledger_chain_problems",
            "Times the chain became unreachable or stopped mining the node's transactions",
            ["problem"],
            registry=self.registry,
        )
        self.discrepancies = Counter(
            "inferledger_discrepancies",
            "Differences found between the node's books and the chain, by kind",
            ["kind"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
