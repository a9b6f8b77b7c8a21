"""Prometheus metrics of the gating service, in a registry of their own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Requests by status, queue and batch sizes, latencies, tokens, and rows routed per expert."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("moe_requests", "Finished requests by gRPC status", ["status"], registry=r)
        self.queue_depth = Gauge("moe_queue_depth", "Requests waiting for a KV-cache slot", registry=r)
        self.running = Gauge("moe_running_sequences", "Sequences being generated", registry=r)
        self.free_slots = Gauge("moe_kv_cache_free_slots", "Free KV-cache slots", registry=r)
        self.time_to_first_token = Histogram("moe_time_to_first_token_seconds", "Arrival to first token",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("moe_inter_token_latency_seconds", "Between two tokens of a stream",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.generated_tokens = Counter("moe_generated_tokens", "Tokens generated", registry=r)
        self.expert_rows = Gauge("moe_expert_rows", "Token rows routed to each expert since start "
                                 "(the capacity planner's input)", ["layer", "expert"], registry=r)
