"""Shared builders for the kernel tests.

TRITON_INTERPRET must be set before triton is first imported (`triton.jit` picks the compiler or
the numpy interpreter when each function, triton's own helpers included, is decorated), so it is set
here, at collection. The Triton kernels then run on CPU through numpy: slow, so every shape in these
tests is tiny. If another test package imported triton before this file ran, without
TRITON_INTERPRET=1 in the environment, the Triton tests cannot run and fail with that reason
(tests/conftest.py sets TRITON_INTERPRET=1 first, so a full run is never in that state).
"""

from __future__ import annotations

import os
import sys

# Decided before setting the variable: was triton already imported in compiled mode?
_TRITON_IMPORTED_COMPILED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Callable, Sequence  # noqa: E402
from typing import NamedTuple  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# The tests hand CPU tensors to the Triton kernels, which only the interpreter accepts.
TRITON_RUNNABLE = os.environ["TRITON_INTERPRET"] == "1" and not _TRITON_IMPORTED_COMPILED


@pytest.fixture(autouse=True)
def _fail_triton_when_not_runnable(request: pytest.FixtureRequest) -> None:
    # Every test that launches a Triton kernel has "triton" in its name or parameter id.
    if "triton" in request.node.name and not TRITON_RUNNABLE:
        pytest.fail("the Triton tests need TRITON_INTERPRET=1 set before anything imports triton")


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
) -> PagedBatch:
    """A batch over a pool whose unused slots hold NaN, so any read outside a context shows.

    Each sequence gets distinct blocks drawn in shuffled order from [first_block_id, num_blocks), so
    block tables are non-contiguous; table entries past a context hold `table_padding`.
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
    return PagedBatch(query, k_cache, v_cache, block_table, torch.tensor(seq_lens, dtype=torch.int32), cu)


def _randn(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(dtype)


@pytest.fixture
def paged_batch() -> Callable[..., PagedBatch]:
    return build_paged_batch
