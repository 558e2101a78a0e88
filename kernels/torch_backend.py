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

`paged_attention_torch` gathers K/V for all sequences at once into
[num_seqs, kv_len, num_kv_heads, head_dim], pads the queries into [num_seqs, max_q_len], builds one
boolean mask (causal at each sequence's offset, plus context padding) and calls
`scaled_dot_product_attention` once. GQA is folded into the query-length axis: the
`num_heads // num_kv_heads` query heads that share a KV head become extra query rows, so K/V are never
repeated and a decode step is a [group, kv_len] problem per KV head rather than [1, kv_len].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_copy_blocks, check_paged_attention, check_reshape_and_cache


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
    dims = check_paged_attention(query, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, out)
    if out is None:
        out = torch.empty_like(query)
    if dims.num_tokens == 0 or dims.num_seqs == 0:
        return out
    device = query.device
    num_seqs, block_size = dims.num_seqs, dims.block_size
    group = dims.num_heads // dims.num_kv_heads

    seq_lens = seq_lens.long()
    cu = cu_seqlens_q.long()
    q_lens = cu[1:] - cu[:-1]  # [S]
    max_q_len = int(q_lens.max())
    num_kv_blocks = -(-int(seq_lens.max()) // block_size)
    kv_len = num_kv_blocks * block_size

    # Gather K/V through the block table. Entries past a sequence's context may be padding
    # (0, -1, anything): they are replaced by block 0, whose values are then zeroed like every
    # slot past the context, because unwritten slots may hold NaN and 0 * NaN would leak through.
    block_starts = torch.arange(num_kv_blocks, device=device) * block_size  # [B]
    block_used = block_starts[None, :] < seq_lens[:, None]  # [S, B]
    block_ids = torch.where(block_used, block_table[:, :num_kv_blocks].long(), 0)  # [S, B]
    kv_pos = torch.arange(kv_len, device=device)  # [L]
    kv_valid = kv_pos[None, :] < seq_lens[:, None]  # [S, L]
    pad = ~kv_valid[:, :, None, None]
    k = k_cache[block_ids].flatten(1, 2).masked_fill_(pad, 0)  # [S, L, Hkv, D]
    v = v_cache[block_ids].flatten(1, 2).masked_fill_(pad, 0)  # [S, L, Hkv, D]

    # Pad the queries into [S, max_q_len]; rows past q_len read a clamped token and are dropped.
    q_local = torch.arange(max_q_len, device=device)  # [Q]
    q_index = (cu[:-1, None] + q_local[None, :]).clamp_(max=dims.num_tokens - 1)  # [S, Q]
    q = query[q_index]  # [S, Q, H, D]
    # Fold each KV head's query heads into rows: [S, Hkv, group * Q, D], row = g * Q + i.
    q = q.view(num_seqs, max_q_len, dims.num_kv_heads, group, dims.head_dim)
    q = q.permute(0, 2, 3, 1, 4).reshape(num_seqs, dims.num_kv_heads, group * max_q_len, dims.head_dim)

    # Query i of sequence s sits at absolute position seq_len - q_len + i and sees positions <= it.
    # Padded query rows (i >= q_len) see the whole context, so no row is fully masked (no NaN).
    q_pos = (seq_lens - q_lens)[:, None] + q_local[None, :]  # [S, Q]
    mask = (kv_pos[None, None, :] <= q_pos[:, :, None]) & kv_valid[:, None, :]  # [S, Q, L]
    mask = mask[:, None].expand(num_seqs, group, max_q_len, kv_len).reshape(num_seqs, 1, -1, kv_len)

    o = F.scaled_dot_product_attention(
        q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )  # [S, Hkv, group * Q, D]
    o = o.view(num_seqs, dims.num_kv_heads, group, max_q_len, dims.head_dim).permute(0, 3, 1, 2, 4)
    o = o.reshape(num_seqs, max_q_len, dims.num_heads, dims.head_dim)  # [S, Q, H, D]

    # Scatter back to token order: token t belongs to sequence seq_of[t] at local index t - cu[seq].
    tokens = torch.arange(dims.num_tokens, device=device)  # [T]
    seq_of = torch.searchsorted(cu[1:], tokens, right=True)  # [T]
    out.copy_(o[seq_of, tokens - cu[seq_of]])
    return out
