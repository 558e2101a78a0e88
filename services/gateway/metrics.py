"""Prometheus metrics of the gateway.

Pool and queue numbers belong to the scheduler: they are mirrored from its `Stats` on each
scrape (`update_from_stats`), gauges as gauges and its running totals as counters. Latency
histograms are observed here, where a request's first token and token spacing are seen.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# (metric name, Stats field, help)
_GAUGES = [
    ("pagedserve_kv_blocks_total", "blocks_total", "KV blocks in the pool."),
    ("pagedserve_kv_blocks_used", "blocks_used", "KV blocks referenced by at least one block table."),
    ("pagedserve_kv_blocks_cached", "blocks_cached", "Unreferenced KV blocks holding cached prefixes."),
    ("pagedserve_kv_blocks_free", "blocks_free", "KV blocks on the free list."),
    ("pagedserve_requests_running", "requests_running", "Sequences running in the scheduler."),
    ("pagedserve_requests_waiting", "requests_waiting", "Sequences waiting in the scheduler."),
    ("pagedserve_kv_utilization", "kv_utilization", "Live tokens over allocated slots in the last step."),
    ("pagedserve_kv_cpu_blocks_total", "cpu_blocks_total", "CPU blocks in the executor's swap space."),
    ("pagedserve_kv_swapped_blocks", "swapped_blocks", "CPU blocks holding swapped-out KV."),
]
_COUNTERS = [
    (
        "pagedserve_prefix_cache_hit_tokens",
        "prefix_cache_hit_tokens",
        "Prompt tokens served from the prefix cache.",
    ),
    (
        "pagedserve_prefix_cache_query_tokens",
        "prefix_cache_query_tokens",
        "Prompt tokens looked up in the prefix cache.",
    ),
    ("pagedserve_preemptions", "preemptions_total", "Requests preempted for lack of KV blocks."),
    ("pagedserve_generated_tokens", "generated_tokens_total", "Tokens generated."),
    ("pagedserve_steps", "steps_total", "Scheduler steps run."),
    ("pagedserve_swap_out_blocks", "swap_out_blocks_total", "KV blocks swapped out to CPU blocks."),
    ("pagedserve_swap_in_blocks", "swap_in_blocks_total", "KV blocks swapped back in from CPU blocks."),
]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _SchedulerCollector(Collector):
    """Yields the last scheduler Stats seen; nothing until the first one arrives."""

    def __init__(self) -> None:
        self.stats = None
        self.up = 0

    def collect(self):
        up = GaugeMetricFamily(
            "pagedserve_scheduler_up", "1 when the last Stats call to the scheduler succeeded."
        )
        up.add_metric([], self.up)
        yield up
        if self.stats is None:
            return
        for name, attr, help_text in _GAUGES:
            yield GaugeMetricFamily(name, help_text, value=getattr(self.stats, attr))
        for name, attr, help_text in _COUNTERS:
            yield CounterMetricFamily(name, help_text, value=getattr(self.stats, attr))


class _DetokenizeCollector(Collector):
    """Totals of the shared Detokenize stream (anything with num_streams_opened/num_batches/num_items)."""

    def __init__(self) -> None:
        self.stream = None

    def collect(self):
        if self.stream is None:
            return
        for name, attr, help_text in (
            ("pagedserve_gateway_detokenize_streams", "num_streams_opened", "Detokenize streams opened."),
            (
                "pagedserve_gateway_detokenize_batches",
                "num_batches",
                "Messages sent on the Detokenize stream.",
            ),
            (
                "pagedserve_gateway_detokenize_items",
                "num_items",
                "Sequence items sent on the Detokenize stream.",
            ),
        ):
            yield CounterMetricFamily(name, help_text, value=getattr(self.stream, attr))


class _PoolCollector:
    """Per pool: requests routed to it, prompt tokens its cache was predicted to hold at
    routing and those it actually served; and requests moved off a failed pool."""

    def __init__(self) -> None:
        self.router = None

    def collect(self):
        router = self.router
        if router is None:
            return
        routed = CounterMetricFamily(
            "pagedserve_pool_requests_routed", "Requests routed to each pool.", labels=["pool"]
        )
        predicted = CounterMetricFamily(
            "pagedserve_pool_predicted_prefix_hit_tokens",
            "Prompt tokens the pool's prefix cache held when the request was routed to it.",
            labels=["pool"],
        )
        actual = CounterMetricFamily(
            "pagedserve_pool_prefix_hit_tokens",
            "Prompt tokens the pool served from its prefix cache.",
            labels=["pool"],
        )
        for pool in router.pools.values():
            routed.add_metric([pool.pool_id], pool.routed)
            predicted.add_metric([pool.pool_id], pool.predicted_hit_tokens)
            actual.add_metric([pool.pool_id], pool.actual_hit_tokens)
        yield routed
        yield predicted
        yield actual
        yield CounterMetricFamily(
            "pagedserve_migrations",
            "Requests moved to another pool when theirs failed.",
            value=router.migrations_total,
        )


class GatewayMetrics:
    """A registry of its own, so tests and several gateways in one process never collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._scheduler = _SchedulerCollector()
        self.registry.register(self._scheduler)
        self._detokenize = _DetokenizeCollector()
        self.registry.register(self._detokenize)
        self._pools = _PoolCollector()
        self.registry.register(self._pools)
        self.time_to_first_token = Histogram(
            "pagedserve_time_to_first_token_seconds",
            "Seconds from a request's arrival at the gateway to its first token.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            "pagedserve_time_per_output_token_seconds",
            "Seconds between consecutive tokens of a request.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.requests_in_flight = Gauge(
            "pagedserve_gateway_requests_in_flight",
            "Requests in flight through this gateway.",
            registry=self.registry,
        )

    def watch_pools(self, router) -> None:
        self._pools.router = router

    def watch_detokenizer(self, stream) -> None:
        self._detokenize.stream = stream

    def observe_first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)

    def observe_token_interval(self, seconds: float) -> None:
        self.time_per_output_token.observe(seconds)

    def update_from_stats(self, stats, up: bool) -> None:
        self._scheduler.up = int(up)
        if up:
            self._scheduler.stats = stats

    def render(self, in_flight: int) -> bytes:
        self.requests_in_flight.set(in_flight)
        return generate_latest(self.registry)
