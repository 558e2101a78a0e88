"""A scheduler's statistics, as its Stats RPC answers them: one definition for the scheduler
that fills it and the gateway (metrics, limits, routing) that reads it."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass(slots=True)
class SchedulerStats:
    """`pagedserve.v1.StatsResponse` as a dataclass (same field names)."""

    blocks_total: int = 0
    blocks_used: int = 0
    blocks_cached: int = 0
    blocks_free: int = 0
    requests_running: int = 0
    requests_waiting: int = 0
    preemptions_total: int = 0
    prefix_cache_hit_tokens: int = 0
    prefix_cache_query_tokens: int = 0
    generated_tokens_total: int = 0
    steps_total: int = 0
    block_size: int = 0
    max_model_len: int = 0
    model: str = ""
    kv_utilization: float = 0.0
    eos_token_ids: list[int] = field(default_factory=list)
    vocab_size: int = 0
    serving: bool = False
    resumed_total: int = 0
    pool_id: str = ""
    blocks_digest: str = ""
    cpu_blocks_total: int = 0
    swapped_blocks: int = 0
    swap_out_blocks_total: int = 0
    swap_in_blocks_total: int = 0

    @classmethod
    def from_proto(cls, msg) -> SchedulerStats:  # msg: pagedserve.v1.StatsResponse
        stats = cls()
        for f in fields(cls):
            value = getattr(msg, f.name)
            setattr(stats, f.name, list(value) if f.name == "eos_token_ids" else value)
        return stats

    def to_proto(self):
        from pagedserve.v1 import scheduler_pb2

        return scheduler_pb2.StatsResponse(**{f.name: getattr(self, f.name) for f in fields(self)})
