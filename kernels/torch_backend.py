"""The CPU production backend: the paged-KV operations in vectorized torch, no Triton.

Same signatures and layouts as the Triton kernels:
    key, value      [num_tokens, num_kv_heads, head_dim]
    k_cache/v_cache [num_blocks, block_size, num_kv_heads, head_dim]; slot = block_id * block_size + offset
    slot_mapping    [num_tokens]            int64 (int32 accepted); -1 = skip the token
    query, out      [num_tokens, num_heads, head_dim]  every scheduled sequence's new tokens back to back
    block_table     [num_seqs, max_blocks]  int32; entries past a sequence's context are never used
    seq_lens        [num_seqs]              int32, context length including the new tokens
    cu_seqlens_q    [num_seqs + 1]          int32, query start of each sequence in `query`
    block_mapping   [num_pairs, 2]          int64, (src, dst) block ids

The attention itself (groups, length buckets, gathers, SDPA) is in `torch_attention`: everything
derived from a step's metadata is an `AttentionPlan`. `paged_attention_torch` builds one per call;
the executor uses `TorchAttentionStep`, which builds the plan and the slots once per forward so that
every layer reuses them, and a layer costs a KV write, one gather and one SDPA call per group.
"""

from __future__ import annotations

import torch

from ._checks import check_copy_blocks, check_paged_attention, check_reshape_and_cache
from .torch_attention import AttentionPlan


def reshape_and_cache_torch(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Writes key/value token i into slot slot_mapping[i] of k_cache/v_cache; slot -1 is skipped."""
    check_reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)
    block_size = k_cache.size(1)
    keep = slot_mapping >= 0  # [num_tokens]
    slots = slot_mapping[keep].long()  # [n]
    block_ids, offsets = slots // block_size, slots % block_size
    k_cache[block_ids, offsets] = key[keep]
    v_cache[block_ids, offsets] = value[keep]


class TorchAttentionStep:
    """The torch backend's per-step state (see `backends.PagedAttentionStep`): the slots and the
    attention plan are derived from the step's metadata once, then every layer reuses them."""

    def __init__(
        self,
        slot_mapping: torch.Tensor,  # [T]
        block_table: torch.Tensor,  # [S, max_blocks]
        seq_lens: torch.Tensor,  # [S]
        cu_seqlens_q: torch.Tensor,  # [S + 1]
        block_size: int,
    ) -> None:
        slots = slot_mapping.long()
        keep = slots >= 0  # [T]
        # None when every token is cached (the executor never pads): no masked copy of key/value.
        self.keep = None if bool(keep.all()) else keep
        self.slots = slots if self.keep is None else slots[keep]  # [n]
        self.plan = AttentionPlan(block_table, seq_lens, cu_seqlens_q, block_size)

    def write_kv(
        self,
        key: torch.Tensor,  # [T, Hkv, D]
        value: torch.Tensor,  # [T, Hkv, D]
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    ) -> None:
        if self.keep is not None:
            key, value = key[self.keep], value[self.keep]
        # A flat slot view of the pool (a view, never a copy: the pool is contiguous); one index_copy_
        # per tensor instead of advanced-index assignment, which builds (block, offset) pairs first.
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, self.slots, key)
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, self.slots, value)

    def attend(
        self,
        query: torch.Tensor,  # [T, H, D]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        scale: float,
        out: torch.Tensor,  # [T, H, D]
    ) -> None:
        self.plan.attend(query, k_cache, v_cache, scale, out)


def copy_blocks_torch(
    k_caches: list[torch.Tensor],
    v_caches: list[torch.Tensor],
    block_mapping: torch.Tensor,
) -> None:
    """Copies block src to block dst for every (src, dst) row of block_mapping, in every layer.

    Destinations must be distinct and must not also be sources (copy-on-write never needs that).
    """
    check_copy_blocks(k_caches, v_caches, block_mapping)
    if block_mapping.numel() == 0:
        return
    src, dst = block_mapping[:, 0].long(), block_mapping[:, 1].long()
    for cache in (*k_caches, *v_caches):
        cache[dst] = cache[src]


def paged_attention_torch(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its paged context; returns `out`.

    The new tokens of sequence s are the last q_len(s) positions of its seq_lens[s] context.
    """
    check_paged_attention(query, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, out)
    if out is None:
        out = torch.empty_like(query)
    plan = AttentionPlan(block_table, seq_lens, cu_seqlens_q, k_cache.size(1))
    plan.attend(query, k_cache, v_cache, scale, out)
    return out
