"""The swap space: CPU blocks that hold preempted sequences' KV while their device blocks serve others.

Same per-block layout as the pool (`kv_pool.stacked_shape`): `kv [2, num_layers, num_cpu_blocks,
block_size, num_kv_heads, head_dim]`, page-locked (pinned) when the pool is on CUDA so that the
transfers run at full speed. The scheduler decides which CPU block holds what (its block manager
accounts CPU blocks like device blocks); the executor only moves blocks as a step's `swap_out`
(device -> CPU) and `swap_in` (CPU -> device) mappings say.

Sizing: `--swap-space` GiB. Default: 4 GiB when the pool is on CUDA, capped at a quarter of the
machine's memory; none on CPU, where the pool already lives in host memory and swapping only
moves bytes between two places in it (give --swap-space to use it anyway, e.g. in tests).
"""

from __future__ import annotations

import logging
import os

import torch

from pagedserve.executor.kv_pool import KVCacheSpec, KVPool, format_bytes, stacked_shape
from pagedserve.kernels.swap_blocks import swap_blocks

log = logging.getLogger(__name__)

GIB = 1024**3
DEFAULT_CUDA_SWAP_SPACE_GIB = 4.0


def host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def num_cpu_blocks(spec: KVCacheSpec, swap_space_gib: float | None, device: torch.device) -> int:
    """CPU blocks for `--swap-space` GiB (None: the default above)."""
    if swap_space_gib is None:
        if device.type != "cuda":
            return 0
        budget = int(DEFAULT_CUDA_SWAP_SPACE_GIB * GIB)
        host = host_memory_bytes()
        if host:
            budget = min(budget, host // 4)
    else:
        budget = int(swap_space_gib * GIB)
    return budget // spec.bytes_per_block


class SwapSpace:
    """CPU K/V blocks beside a `KVPool`; `num_blocks` may be 0 (no swapping)."""

    def __init__(self, pool: KVPool, num_blocks: int) -> None:
        self.pool = pool
        self.num_blocks = num_blocks
        pin = pool.device.type == "cuda"
        self.kv = torch.zeros(stacked_shape(pool.spec, num_blocks), dtype=pool.spec.dtype, pin_memory=pin)
        if num_blocks:
            log.info(
                "swap space: %d CPU blocks, %s%s",
                num_blocks,
                format_bytes(num_blocks * pool.spec.bytes_per_block),
                " (pinned)" if pin else "",
            )

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Copy device block `gpu` to CPU block `cpu` for each (gpu, cpu), every layer at once."""
        if pairs:
            swap_blocks(self.pool.kv, self.kv, torch.tensor(pairs, dtype=torch.int64))

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Copy CPU block `cpu` to device block `gpu` for each (cpu, gpu), every layer at once."""
        if pairs:
            swap_blocks(self.kv, self.pool.kv, torch.tensor(pairs, dtype=torch.int64))
