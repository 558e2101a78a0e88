"""The scheduler's configuration: flags (`SchedulerConfig`) and the limits the policy runs under."""

from __future__ import annotations

from dataclasses import dataclass

from pagedserve.common.step import ExecutorInfo
from pagedserve.scheduler.swap import DEFAULT_SWAP_MIN_TOKENS, PreemptionMode


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Built once from flags in `server.main` and passed down."""

    redis_url: str
    host: str = "0.0.0.0"
    port: int = 50053
    executor: str = "localhost:50054"
    pool_id: str = ""  # "" means derived from the executor address
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_queued_requests: int = 1024
    max_model_len: int | None = None  # None means the executor's
    lease_ttl: float = 3.0  # seconds the pool's lease lasts unrenewed
    stall_timeout: float = 30.0  # seconds an unreachable executor may stall requests
    attach_timeout: float = 30.0  # seconds a resumed request waits for its client
    advertise_address: str = ""  # host:port in the pool registry ("" : from host and port)
    preemption_mode: str = "auto"  # auto | recompute | swap (swap.py)
    swap_min_tokens: int = DEFAULT_SWAP_MIN_TOKENS  # auto: swap sequences with this many computed tokens


@dataclass(frozen=True, slots=True)
class SchedulerLimits:
    """What the policy needs: the config's limits and the executor pool's geometry."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_queued_requests: int
    max_model_len: int
    num_blocks: int
    block_size: int
    eos_token_ids: frozenset[int]
    vocab_size: int
    model: str = ""
    num_cpu_blocks: int = 0  # the executor's swap space
    preemption_mode: PreemptionMode = PreemptionMode.AUTO
    swap_min_tokens: int = DEFAULT_SWAP_MIN_TOKENS

    @classmethod
    def from_info(
        cls,
        info: ExecutorInfo,
        *,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        max_queued_requests: int = 1024,
        max_model_len: int | None = None,
        preemption_mode: str = "auto",
        swap_min_tokens: int = DEFAULT_SWAP_MIN_TOKENS,
    ) -> SchedulerLimits:
        """The executor's facts with the configured limits; max_model_len never exceeds the executor's."""
        if max_num_seqs < 1 or max_num_batched_tokens < 1 or max_queued_requests < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and max_queued_requests must be >= 1")
        if preemption_mode not in tuple(PreemptionMode):
            raise ValueError(
                f"--preemption-mode must be one of auto, recompute, swap, got {preemption_mode!r}"
            )
        if swap_min_tokens < 1:
            raise ValueError(f"--swap-min-tokens must be >= 1, got {swap_min_tokens}")
        return cls(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_queued_requests=max_queued_requests,
            max_model_len=min(max_model_len or info.max_model_len, info.max_model_len),
            num_blocks=info.num_blocks,
            block_size=info.block_size,
            eos_token_ids=frozenset(info.eos_token_ids),
            vocab_size=info.vocab_size,
            model=info.model,
            num_cpu_blocks=info.num_cpu_blocks,
            preemption_mode=PreemptionMode(preemption_mode),
            swap_min_tokens=swap_min_tokens,
        )
