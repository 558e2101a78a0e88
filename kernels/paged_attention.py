"""Causal attention over the paged KV pool: prefill, chunked prefill and decode in one launch.

Layouts:
    query, out      [num_tokens, num_heads, head_dim]   every scheduled sequence's new tokens back to back
    k_cache/v_cache [num_blocks, block_size, num_kv_heads, head_dim]; slot = block_id * block_size + offset
    block_table     [num_seqs, max_blocks]  int32; row s lists sequence s's blocks in order; entries past
                    cdiv(seq_lens[s], block_size) are padding (any value) and are never read
    seq_lens        [num_seqs]              int32, context length INCLUDING the new tokens
    cu_seqlens_q    [num_seqs + 1]          int32, sequence s's new tokens are query[cu[s]:cu[s+1]]

The new tokens of sequence s are the last q_len = cu[s+1] - cu[s] positions of its context, so query
i of s sits at absolute position seq_lens[s] - q_len + i and attends to positions 0..that position.
Their keys and values must already be in the pool (`reshape_and_cache` runs first).
GQA: query head h reads KV head h // (num_heads // num_kv_heads); any integer ratio works.

Kernel: one program per (tile of BLOCK_Q query tokens of one sequence, KV head, context split). The
tile's rows are the BLOCK_Q tokens times the QUERIES_PER_KV query heads sharing that KV head (padded
to BLOCK_M), so each K/V tile is loaded once for the whole group. A program finds its sequence by
binary search over cu_seqlens_q (no host sync), walks its part of the context TILE_N positions at a
time gathering K/V through the block table, and keeps an online softmax in fp32. Block ids and token
indices are widened to int64 before they meet a stride, so pools past 2^31 elements do not overflow.

Split context (decode steps of few sequences): one program per sequence and KV head leaves most of a
GPU idle while it walks a long context alone (at batch 1 with a 1,024-token context, 1% of the
card's bandwidth). Such steps split each context into `num_splits` equal parts, rounded to TILE_N,
computed per sequence in the kernel from its own length; each part's program writes its unnormalized
output, running max and sum to an fp32 workspace, and `_combine_splits_kernel` rescales and adds
them. The number of splits depends only on shapes (sequences, KV heads, the block table's width),
never on the contexts' values, so a CUDA graph captured for a batch size stays valid.

Steps split only inside `backends.splitting_decode_contexts()`, under which the executor captures
its CUDA graphs of decode steps: launched from Python one at a time, the combine kernel and the
workspace cost more host time than the split saves on the GPU (measured on an H200, see
docs/BENCHMARKS.md), while a graph replays them with no launch cost.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._checks import check_paged_attention
from .backends import decode_contexts_split, is_triton_interpreted

LOG2E = 1.4426950408889634


@triton.jit
def _find_seq_idx(
    cu_seqlens_q_ptr,  # [num_seqs + 1]
    q_block,
    num_seqs,
    BLOCK_Q: tl.constexpr,
):
    # Sequence s owns the q blocks starting at cu[s] // BLOCK_Q + s: an upper bound of the blocks
    # used by the sequences before it, so every sequence has room for cdiv(q_len, BLOCK_Q) blocks.
    left = 0
    right = num_seqs
    while left < right:
        mid = (left + right) // 2
        first_block = tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid
        if first_block <= q_block:
            left = mid + 1
        else:
            right = mid
    return left - 1


@triton.jit
def _paged_attention_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    query_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table_ptr,  # [num_seqs, max_blocks]
    seq_lens_ptr,  # [num_seqs]
    cu_seqlens_q_ptr,  # [num_seqs + 1]
    part_out_ptr,  # SPLIT: [num_tokens, num_heads, num_splits, HEAD_DIM_PADDED] fp32, else unused
    part_max_ptr,  # SPLIT: [num_tokens, num_heads, num_splits] fp32, running max (log2 domain)
    part_sum_ptr,  # SPLIT: [num_tokens, num_heads, num_splits] fp32, softmax denominator
    qk_scale,  # softmax scale * log2(e)
    num_seqs: tl.int32,
    num_heads: tl.int32,
    num_splits: tl.int32,
    stride_q_t: tl.int64,
    stride_q_h: tl.int64,
    stride_o_t: tl.int64,
    stride_o_h: tl.int64,
    stride_k_b: tl.int64,
    stride_k_s: tl.int64,
    stride_k_h: tl.int64,
    stride_v_b: tl.int64,
    stride_v_s: tl.int64,
    stride_v_h: tl.int64,
    stride_bt_s: tl.int64,
    stride_bt_b: tl.int64,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,  # next power of two >= max(HEAD_DIM, 16)
    QUERIES_PER_KV: tl.constexpr,  # num_heads // num_kv_heads
    BLOCK_SIZE: tl.constexpr,  # positions per KV-pool block
    BLOCK_Q: tl.constexpr,  # query tokens per program
    BLOCK_M: tl.constexpr,  # rows per program: BLOCK_Q * QUERIES_PER_KV, padded to a power of two
    TILE_N: tl.constexpr,  # context positions per iteration
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 (no tf32 rounding), else the default
    DOT_IN_FP32: tl.constexpr,  # upcast dot operands: the interpreter cannot multiply bf16 (triton#11584)
    SPLIT: tl.constexpr,  # write per-split partial results (num_splits > 1) instead of `out`
):
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq = _find_seq_idx(cu_seqlens_q_ptr, q_block, num_seqs, BLOCK_Q)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    first_q = (q_block - (q_start // BLOCK_Q + seq)) * BLOCK_Q  # first local query of this tile
    if first_q >= q_len:
        return  # spare program: the grid is an upper bound on the tiles needed
    context_len = tl.load(seq_lens_ptr + seq) - q_len  # positions before the new tokens

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PADDED)
    q_local = first_q + offs_m // QUERIES_PER_KV  # [M]
    head = kv_head * QUERIES_PER_KV + offs_m % QUERIES_PER_KV  # [M]
    row_valid = (offs_m < BLOCK_Q * QUERIES_PER_KV) & (q_local < q_len)  # [M]
    d_valid = offs_d < HEAD_DIM  # [D]
    token = (q_start + q_local).to(tl.int64)  # [M]
    q_pos = context_len + q_local  # [M] absolute position of each row's query

    q_offs = token[:, None] * stride_q_t + head[:, None] * stride_q_h + offs_d[None, :]
    q = tl.load(query_ptr + q_offs, mask=row_valid[:, None] & d_valid[None, :], other=0.0)  # [M, D]
    if DOT_IN_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], dtype=tl.float32)

    # No row of this tile sees past its last query, so neither the context beyond it nor the
    # block-table entries beyond it (which may be padding) are read.
    kv_end = context_len + tl.minimum(first_q + BLOCK_Q, q_len)
    # This program's part of [0, kv_end): all of it, or one of num_splits parts of whole tiles.
    split_len = tl.cdiv(tl.cdiv(kv_end, num_splits), TILE_N) * TILE_N
    kv_lo = split * split_len
    kv_hi = tl.minimum(kv_end, kv_lo + split_len)
    block_table_row = block_table_ptr + seq.to(tl.int64) * stride_bt_s
    kv_head_off = kv_head.to(tl.int64)
    for start_n in range(kv_lo, kv_hi, TILE_N):
        kv_pos = start_n + tl.arange(0, TILE_N)  # [N]
        kv_valid = kv_pos < kv_hi
        block_id = tl.load(block_table_row + (kv_pos // BLOCK_SIZE) * stride_bt_b, mask=kv_valid, other=0)
        block_id = block_id.to(tl.int64)
        in_block = kv_pos % BLOCK_SIZE

        k_offs = block_id[None, :] * stride_k_b + in_block[None, :] * stride_k_s + kv_head_off * stride_k_h
        k = tl.load(
            k_cache_ptr + k_offs + offs_d[:, None], mask=d_valid[:, None] & kv_valid[None, :], other=0.0
        )  # [D, N]
        if DOT_IN_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [M, N], log2 domain
        visible = (kv_pos[None, :] <= q_pos[:, None]) & kv_valid[None, :] & row_valid[:, None]
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp2(s - m_safe[:, None])  # [M, N]
        alpha = tl.exp2(m_i - m_safe)  # [M]
        l_i = l_i * alpha + tl.sum(p, 1)

        v_offs = block_id[:, None] * stride_v_b + in_block[:, None] * stride_v_s + kv_head_off * stride_v_h
        v = tl.load(
            v_cache_ptr + v_offs + offs_d[None, :], mask=kv_valid[:, None] & d_valid[None, :], other=0.0
        )  # [N, D]
        p = p.to(v.dtype)  # the P @ V product runs in the cache dtype, as in flash attention
        if DOT_IN_FP32:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new

    if SPLIT:  # every (row, split) is written, an empty part as max -inf and sum 0
        part = (token * num_heads + head) * num_splits + split  # [M]
        tl.store(part_max_ptr + part, m_i, mask=row_valid)
        tl.store(part_sum_ptr + part, l_i, mask=row_valid)
        p_offs = part[:, None] * HEAD_DIM_PADDED + offs_d[None, :]
        tl.store(part_out_ptr + p_offs, acc, mask=row_valid[:, None])
    else:
        acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_offs = token[:, None] * stride_o_t + head[:, None] * stride_o_h + offs_d[None, :]
        tl.store(
            out_ptr + o_offs, acc.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :]
        )


@triton.jit
def _combine_splits_kernel(
    out_ptr,  # [num_tokens, num_heads, head_dim]
    part_out_ptr,  # [num_tokens, num_heads, num_splits, HEAD_DIM_PADDED] fp32
    part_max_ptr,  # [num_tokens, num_heads, num_splits] fp32
    part_sum_ptr,  # [num_tokens, num_heads, num_splits] fp32
    num_heads: tl.int32,
    num_splits: tl.int32,
    stride_o_t: tl.int64,
    stride_o_h: tl.int64,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
    SPLITS_PADDED: tl.constexpr,  # next power of two >= num_splits
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PADDED)
    offs_d = tl.arange(0, HEAD_DIM_PADDED)
    s_valid = offs_s < num_splits
    part = (token * num_heads + head) * num_splits + offs_s  # [S]
    m = tl.load(part_max_ptr + part, mask=s_valid, other=float("-inf"))
    l_part = tl.load(part_sum_ptr + part, mask=s_valid, other=0.0)
    m_max = tl.max(m, 0)
    weight = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # [S]; an empty part: 0
    total = tl.sum(l_part * weight, 0)
    acc = tl.load(
        part_out_ptr + part[:, None] * HEAD_DIM_PADDED + offs_d[None, :], mask=s_valid[:, None], other=0.0
    )
    o = tl.sum(acc * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)  # [D]
    tl.store(
        out_ptr + token * stride_o_t + head * stride_o_h + offs_d,
        o.to(out_ptr.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )


MAX_SPLITS = 16
MIN_SPLIT_TOKENS = 128  # no part shorter than this, by the block table's width


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _tile_rows(num_heads: int, num_kv_heads: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_Q): a program's rows, a power of two of at least 16, and the query tokens
    whose heads of one KV group they hold."""
    block_m = max(16, triton.next_power_of_2(num_heads // num_kv_heads))
    return block_m, block_m // (num_heads // num_kv_heads)


def decode_num_splits(
    num_seqs: int, num_heads: int, num_kv_heads: int, max_context: int, device: torch.device
) -> int:
    """The parts per context of a decode step (one token per sequence) of `num_seqs` sequences,
    when it splits: `default_num_splits` for the kernel's grid of that step."""
    tiles = num_seqs // _tile_rows(num_heads, num_kv_heads)[1] + num_seqs
    return default_num_splits(tiles * num_kv_heads, max_context, device)


def default_num_splits(num_programs: int, max_context: int, device: torch.device) -> int:
    """Parts per context for a launch of `num_programs` programs (tiles x KV heads) over contexts
    of at most `max_context` positions: enough for about two programs per multiprocessor, at most
    MAX_SPLITS, none shorter than MIN_SPLIT_TOKENS; 1 off CUDA (the interpreter)."""
    if device.type != "cuda" or num_programs <= 0:
        return 1
    wanted = triton.cdiv(2 * _multiprocessors(device.index or 0), num_programs)
    return max(1, min(wanted, MAX_SPLITS, max_context // MIN_SPLIT_TOKENS))


def paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its paged context (Triton); returns `out`.

    `num_splits` parts per context (see the module's docstring); None: `decode_num_splits` for a
    step of one token per sequence (a decode step) inside `splitting_decode_contexts()`, else 1."""
    dims = check_paged_attention(query, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, out)
    if dims.head_dim > 256:
        raise ValueError(
            f"query (shape {tuple(query.shape)}): head_dim {dims.head_dim} > 256 is not supported"
        )
    if out is None:
        out = torch.empty_like(query)
    if dims.num_tokens == 0 or dims.num_seqs == 0:
        return out

    queries_per_kv = dims.num_heads // dims.num_kv_heads
    block_m, block_q = _tile_rows(dims.num_heads, dims.num_kv_heads)
    head_dim_padded = max(16, triton.next_power_of_2(dims.head_dim))
    # Sequence s's tiles start at cu[s] // block_q + s (see _find_seq_idx), so this many suffice.
    tiles = dims.num_tokens // block_q + dims.num_seqs
    if num_splits is None:
        num_splits = 1
        if dims.num_tokens == dims.num_seqs and decode_contexts_split():
            max_context = block_table.size(1) * dims.block_size
            num_splits = decode_num_splits(
                dims.num_seqs, dims.num_heads, dims.num_kv_heads, max_context, query.device
            )
    if num_splits > 1:
        part_out = torch.empty(
            dims.num_tokens,
            dims.num_heads,
            num_splits,
            head_dim_padded,
            dtype=torch.float32,
            device=query.device,
        )
        part_max = torch.empty(part_out.shape[:3], dtype=torch.float32, device=query.device)
        part_sum = torch.empty_like(part_max)
    else:
        part_out = part_max = part_sum = out  # not read or written
    _paged_attention_kernel[(tiles, dims.num_kv_heads, num_splits)](
        out,
        query,
        k_cache,
        v_cache,
        block_table,
        seq_lens,
        cu_seqlens_q,
        part_out,
        part_max,
        part_sum,
        scale * LOG2E,
        dims.num_seqs,
        dims.num_heads,
        num_splits,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_table.stride(0),
        block_table.stride(1),
        HEAD_DIM=dims.head_dim,
        HEAD_DIM_PADDED=head_dim_padded,
        QUERIES_PER_KV=queries_per_kv,
        BLOCK_SIZE=dims.block_size,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        TILE_N=64 if head_dim_padded <= 128 else 32,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        DOT_IN_FP32=query.dtype == torch.bfloat16 and is_triton_interpreted(),
        SPLIT=num_splits > 1,
        num_warps=4,
        num_stages=2,
    )
    if num_splits > 1:
        _combine_splits_kernel[(dims.num_tokens, dims.num_heads)](
            out,
            part_out,
            part_max,
            part_sum,
            dims.num_heads,
            num_splits,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=dims.head_dim,
            HEAD_DIM_PADDED=head_dim_padded,
            SPLITS_PADDED=triton.next_power_of_2(num_splits),
        )
    return out
