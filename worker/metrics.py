"""The worker's Prometheus metrics; no label ever carries a session id."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        prefix = "sinkserve_worker"
        self.ttft = Histogram(
            f"{prefix}_time_to_first_token_seconds",
            "From a user turn's arrival to its reply's first token.",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.itl = Histogram(
            f"{prefix}_inter_token_latency_seconds",
            "Between consecutive tokens of one reply.",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.step_duration = Histogram(
            f"{prefix}_step_duration_seconds",
            "One packed forward pass and its bookkeeping.",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.tokens_prefilled = Counter(
            f"{prefix}_tokens_prefilled_total", "Tokens fed by prefill.", registry=r
        )
        self.tokens_reused = Counter(
            f"{prefix}_tokens_reused_total",
            "Cached tokens a new turn did not have to prefill again.",
            registry=r,
        )
        self.tokens_generated = Counter(
            f"{prefix}_tokens_generated_total", "Tokens sampled.", registry=r
        )
        self.tokens_evicted = Counter(
            f"{prefix}_tokens_evicted_total", "Tokens evicted from caches.", registry=r
        )
        self.evictions = Counter(
            f"{prefix}_evictions_total", "Eviction events sent to clients.", registry=r
        )
        self.turns = Counter(
            f"{prefix}_turns_total",
            "Finished turns, by end reason.",
            ["reason"],
            registry=r,
        )
        self.errors = Counter(
            f"{prefix}_request_errors_total",
            "Requests refused, by gRPC status code.",
            ["code"],
            registry=r,
        )
        self.interruptions = Counter(
            f"{prefix}_interruptions_total",
            "User interruptions, by how the heard point was given.",
            ["kind"],
            registry=r,
        )
        self.tokens_rolled_back = Counter(
            f"{prefix}_tokens_rolled_back_total",
            "Tokens taken back out of caches: reply tokens cut by interruptions, "
            "and streamed user text revised.",
            registry=r,
        )
        self.interruption_latency = Histogram(
            f"{prefix}_interruption_latency_seconds",
            "From an interruption's arrival to the event that confirms the cut "
            "(no reply token follows it).",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.snapshot_seconds = Histogram(
            f"{prefix}_snapshot_write_seconds",
            "Writing one session snapshot to the store.",
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.snapshot_bytes = Histogram(
            f"{prefix}_snapshot_bytes",
            "Size of one session snapshot.",
            buckets=(1e4, 1e5, 1e6, 1e7, 5e7, 1e8, 5e8),
            registry=r,
        )
        self.snapshot_failures = Counter(
            f"{prefix}_snapshot_failures_total",
            "Snapshots that could not be stored (the session lives on).",
            registry=r,
        )
        self.restores = Counter(
            f"{prefix}_restores_total", "Sessions restored from snapshots.", registry=r
        )
        self.offloads = Counter(
            f"{prefix}_offloads_total",
            "Idle sessions offloaded to snapshots.",
            registry=r,
        )
        self.active_sessions = Gauge(
            f"{prefix}_active_sessions", "Sessions held by this worker.", registry=r
        )
        self.generating_sessions = Gauge(
            f"{prefix}_generating_sessions",
            "Sessions in the last decode batch.",
            registry=r,
        )
        self.cache_tokens = Gauge(
            f"{prefix}_cache_occupancy_tokens",
            "Tokens cached, summed over sessions.",
            registry=r,
        )
        self.cache_capacity = Gauge(
            f"{prefix}_cache_capacity_tokens",
            "sink_size + window_size, summed over sessions.",
            registry=r,
        )
        self.cache_bytes = Gauge(
            f"{prefix}_cache_bytes", "Bytes allocated for session caches.", registry=r
        )
