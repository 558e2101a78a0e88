"""The physical paged KV pool: one `k_cache` and one `v_cache` per attention layer.

Layout, per layer: `[num_blocks, block_size, num_kv_heads, head_dim]` in the model dtype. A slot is
`block_id * block_size + offset`. All layers are views of one tensor `kv` of shape
`[2, num_layers, num_blocks, block_size, num_kv_heads, head_dim]` (K then V), so that moving a block
of every layer to or from the swap space (swap_space.py) is one gather and one scatter. The pool only holds tensors; which block belongs to whom is the
scheduler's business (in Redis), and the executor only reads and writes through block tables.

Sizing, in order of precedence: an explicit block count, a byte budget, or (on CUDA) a fraction of
the device memory left after a profiling forward at the largest batch (see `ModelRunner.profile`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from pagedserve.common.sizes import cdiv

log = logging.getLogger(__name__)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    """The shape of one pool: what a block costs, independent of how many there are."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_size: int

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across every layer, K and V together."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def blocks_per_sequence(self, max_model_len: int) -> int:
        return cdiv(max_model_len, self.block_size)


def stacked_shape(spec: KVCacheSpec, num_blocks: int) -> tuple[int, ...]:
    """[2, num_layers, num_blocks, block_size, num_kv_heads, head_dim]: K and V of every layer."""
    return (2, spec.num_layers, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)


class KVPool:
    """Per-layer K/V block tensors. Invariant: every layer's tensors share one shape and dtype."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device | str) -> None:
        if num_blocks < 1:
            raise ValueError(f"a KV pool needs at least one block, got num_blocks={num_blocks}")
        self.spec = spec
        self.num_blocks = num_blocks
        self.block_size = spec.block_size
        self.device = torch.device(device)
        # Zeroed, not empty: unwritten slots are masked by the kernels anyway, but zeros keep a
        # fresh pool deterministic and make the memory resident now rather than mid-step.
        self.kv = torch.zeros(stacked_shape(spec, num_blocks), dtype=spec.dtype, device=self.device)
        self.k_caches: list[torch.Tensor] = list(self.kv[0])  # per layer [num_blocks, bs, Hkv, D] views
        self.v_caches: list[torch.Tensor] = list(self.kv[1])

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.spec.bytes_per_block

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def max_concurrency(self, max_model_len: int) -> float:
        """How many sequences of max_model_len tokens fit at once."""
        return self.num_tokens / max_model_len

    def describe(self, max_model_len: int) -> str:
        return (
            f"KV pool: {self.num_blocks} blocks x {self.block_size} tokens = {self.num_tokens} tokens, "
            f"{format_bytes(self.num_bytes)} ({self.spec.num_layers} layers, {self.spec.num_kv_heads} KV heads, "
            f"head_dim {self.spec.head_dim}, {str(self.spec.dtype).removeprefix('torch.')}, "
            f"{format_bytes(self.spec.bytes_per_block)} per block); "
            f"max concurrency at max_model_len={max_model_len}: {self.max_concurrency(max_model_len):.2f}x"
        )


def num_blocks_from_memory(spec: KVCacheSpec, kv_cache_memory: int) -> int:
    """Blocks that fit in `kv_cache_memory` bytes."""
    return kv_cache_memory // spec.bytes_per_block


def num_blocks_from_gpu_utilization(
    spec: KVCacheSpec, total_memory: int, peak_memory: int, gpu_memory_utilization: float
) -> int:
    """Blocks that fit in `total * utilization - peak`, where `peak` is what the weights and the
    largest forward's activations took (measured by a profiling forward)."""
    available = int(total_memory * gpu_memory_utilization) - peak_memory
    if available <= 0:
        raise ValueError(
            f"no memory left for the KV pool: the model and a forward at the largest batch take "
            f"{format_bytes(peak_memory)} but --gpu-memory-utilization={gpu_memory_utilization} allows "
            f"{format_bytes(total_memory * gpu_memory_utilization)} of {format_bytes(total_memory)}; "
            "raise it, or lower --max-num-batched-tokens"
        )
    return available // spec.bytes_per_block


def check_fits(spec: KVCacheSpec, num_blocks: int, max_model_len: int) -> None:
    """Fail with what would fit when one sequence of max_model_len tokens does not."""
    needed = spec.blocks_per_sequence(max_model_len)
    if num_blocks >= needed:
        return
    fits_len = num_blocks * spec.block_size
    raise ValueError(
        f"the KV pool is too small: {num_blocks} blocks ({num_blocks * spec.block_size} tokens, "
        f"{format_bytes(num_blocks * spec.bytes_per_block)}) cannot hold one sequence of "
        f"max_model_len={max_model_len} tokens, which needs {needed} blocks "
        f"({format_bytes(needed * spec.bytes_per_block)} at {format_bytes(spec.bytes_per_block)} per block); "
        f"give --num-kv-blocks >= {needed} or --kv-cache-memory >= {needed * spec.bytes_per_block}, "
        f"or lower --max-model-len to at most {fits_len}"
    )
