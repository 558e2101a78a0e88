"""Batches for checking the paged-KV kernels against their references: the CPU tests
(tests/kernels) and the GPU check at model shapes (bench/gpu_check.py) build them here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


class PagedBatch(NamedTuple):
    query: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32

    def args(self) -> tuple[torch.Tensor, ...]:
        return tuple(self)


def build_paged_batch(
    q_lens: Sequence[int],
    seq_lens: Sequence[int],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    num_blocks: int | None = None,
    first_block_id: int = 0,
    extra_table_columns: int = 2,
    table_padding: int = -1,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> PagedBatch:
    """A batch over a pool whose unused slots hold NaN, so any read outside a context shows.

    Each sequence gets distinct blocks drawn in shuffled order from [first_block_id, num_blocks), so
    block tables are non-contiguous; table entries past a context hold `table_padding`. Drawn on the
    CPU from `seed` (the same values on every device), then moved to `device`.
    """
    assert len(q_lens) == len(seq_lens) and all(0 <= q <= s for q, s in zip(q_lens, seq_lens, strict=True))
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    needed = sum(blocks_per_seq)
    if num_blocks is None:
        num_blocks = first_block_id + needed + 3
    assert num_blocks - first_block_id >= needed
    pool_ids = first_block_id + torch.randperm(num_blocks - first_block_id, generator=gen)[:needed]

    max_blocks = max(blocks_per_seq, default=0) + extra_table_columns
    block_table = torch.full((len(seq_lens), max_blocks), table_padding, dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    start = 0
    for seq, (seq_len, n) in enumerate(zip(seq_lens, blocks_per_seq, strict=True)):
        ids = pool_ids[start : start + n]
        start += n
        block_table[seq, :n] = ids.to(torch.int32)
        slots = ids[:, None] * block_size + torch.arange(block_size)  # [n, block_size]
        slots = slots.flatten()[:seq_len]
        k_cache.view(-1, num_kv_heads, head_dim)[slots] = _randn(
            (seq_len, num_kv_heads, head_dim), gen, dtype
        )
        v_cache.view(-1, num_kv_heads, head_dim)[slots] = _randn(
            (seq_len, num_kv_heads, head_dim), gen, dtype
        )

    query = _randn((sum(q_lens), num_heads, head_dim), gen, dtype)
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(q_lens, dtype=torch.int32).cumsum(0)
    batch = PagedBatch(query, k_cache, v_cache, block_table, torch.tensor(seq_lens, dtype=torch.int32), cu)
    return PagedBatch(*(t.to(device) for t in batch))


def _randn(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(dtype)
