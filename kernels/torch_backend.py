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

`paged_attention_torch` works on at most two groups of sequences, decodes (q_len == 1) and the rest
(prefills and chunked prefills), so a long prefill never pads every decode query to its length. For
each group it gathers K/V for all its sequences at once into [num_seqs, kv_len, num_kv_heads,
head_dim], pads the queries into [num_seqs, max_q_len] with index tensors, builds one boolean mask
(causal at each sequence's offset, plus context padding) and calls `scaled_dot_product_attention`
once. GQA is folded into the query axis: the query heads that share a KV head become extra query
rows, so K/V are never repeated and a decode is a [group, kv_len] problem per KV head. A group of
whole prompts of one length (no cached context, no padding) uses `is_causal` instead of a mask,
which lets SDPA skip the masked half.

The gathered K/V land in a per-thread workspace that is reused across calls (and grows to the
largest batch seen): a fresh allocation of that size costs more in page faults than the gather.
"""

from __future__ import annotations

import threading

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


class _Workspace(threading.local):
    """Per-thread scratch buffers for gathered K/V, one per (device, dtype), grown on demand."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self.buffers.get((device, dtype))
        if buf is None or buf.numel() < numel:
            # A normal tensor, even when first needed under inference_mode: an inference tensor
            # could not be written by a later call made outside it.
            with torch.inference_mode(False):
                buf = torch.empty(numel, dtype=dtype, device=device)
            self.buffers[(device, dtype)] = buf
        return buf[:numel]


_workspace = _Workspace()


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
    if query.size(0) == 0:
        return out
    q_starts = cu_seqlens_q[:-1].long()  # [S]
    q_lens = cu_seqlens_q[1:].long() - q_starts  # [S]
    is_decode = q_lens == 1
    for group in (is_decode, q_lens > 1):
        seqs = group.nonzero().squeeze(1)  # [S_group]
        if seqs.numel() == 0:
            continue
        _attend(
            query,
            k_cache,
            v_cache,
            block_table.index_select(0, seqs),
            seq_lens.index_select(0, seqs).long(),
            q_starts.index_select(0, seqs),
            q_lens.index_select(0, seqs),
            scale,
            out,
        )
    return out


def _attend(
    query: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_table: torch.Tensor,  # [S, max_blocks]
    seq_lens: torch.Tensor,  # [S] int64
    q_starts: torch.Tensor,  # [S] int64
    q_lens: torch.Tensor,  # [S] int64, all >= 1
    scale: float,
    out: torch.Tensor,  # [T, H, D], written at the group's tokens only
) -> None:
    device = query.device
    num_seqs = seq_lens.size(0)
    _, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    max_q_len = int(q_lens.max())
    max_seq_len = int(seq_lens.max())
    num_kv_blocks = -(-max_seq_len // block_size)
    kv_len = num_kv_blocks * block_size
    # Whole prompts of one length: no cached context, nothing padded, plain top-left causal.
    whole_prompts = max_q_len > 1 and bool(((q_lens == max_q_len) & (seq_lens == max_q_len)).all())

    # Gather K/V through the block table. Entries past a sequence's context may be padding
    # (0, -1, anything): they are replaced by block 0 and, like every slot past the context, zeroed
    # before use, because unwritten slots may hold NaN and a masked 0 * NaN would still leak through.
    block_starts = torch.arange(num_kv_blocks, device=device) * block_size  # [B]
    block_used = block_starts[None, :] < seq_lens[:, None]  # [S, B]
    block_ids = torch.where(block_used, block_table[:, :num_kv_blocks].long(), 0).flatten()  # [S * B]
    kv_numel = num_seqs * kv_len * num_kv_heads * head_dim
    buf = _workspace.get(2 * kv_numel, query.dtype, device)
    k = torch.index_select(k_cache, 0, block_ids, out=buf[:kv_numel].view(-1, *k_cache.shape[1:]))
    v = torch.index_select(v_cache, 0, block_ids, out=buf[kv_numel:].view(-1, *v_cache.shape[1:]))
    k = k.view(num_seqs, kv_len, num_kv_heads, head_dim)  # [S, L, Hkv, D]
    v = v.view(num_seqs, kv_len, num_kv_heads, head_dim)  # [S, L, Hkv, D]

    q_local = torch.arange(max_q_len, device=device)  # [Q]
    q_valid = q_local[None, :] < q_lens[:, None]  # [S, Q]
    q_index = torch.where(q_valid, q_starts[:, None] + q_local[None, :], 0)  # [S, Q] token of each row
    q = query[q_index]  # [S, Q, H, D]

    if whole_prompts:
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k[:, :max_q_len].transpose(1, 2),
            v[:, :max_q_len].transpose(1, 2),
            is_causal=True,
            scale=scale,
            enable_gqa=group > 1,
        )  # [S, H, Q, D]
        o = o.transpose(1, 2)  # [S, Q, H, D]
    else:
        kv_pos = torch.arange(kv_len, device=device)  # [L]
        kv_valid = kv_pos[None, :] < seq_lens[:, None]  # [S, L]
        padded = (~kv_valid).flatten().nonzero().squeeze(1)  # rows of [S * L]
        k.view(-1, num_kv_heads, head_dim).index_fill_(0, padded, 0)
        v.view(-1, num_kv_heads, head_dim).index_fill_(0, padded, 0)
        # Query i sits at absolute position seq_len - q_len + i and sees positions up to it. Padded
        # query rows (i >= q_len) see the whole context, so no row is fully masked (no NaN).
        q_pos = (seq_lens - q_lens)[:, None] + q_local[None, :]  # [S, Q]
        mask = (kv_pos[None, None, :] <= q_pos[:, :, None]) & kv_valid[:, None, :]  # [S, Q, L]
        mask = mask[:, None].expand(num_seqs, group, max_q_len, kv_len).reshape(num_seqs, 1, -1, kv_len)
        # Fold the query heads of each KV head into rows: [S, Hkv, group * Q, D], row = g * Q + i.
        q = q.view(num_seqs, max_q_len, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
        q = q.reshape(num_seqs, num_kv_heads, group * max_q_len, head_dim)
        o = F.scaled_dot_product_attention(
            q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
        )  # [S, Hkv, group * Q, D]
        o = o.view(num_seqs, num_kv_heads, group, max_q_len, head_dim).permute(0, 3, 1, 2, 4)
        o = o.reshape(num_seqs, max_q_len, num_heads, head_dim)  # [S, Q, H, D]

    if max_q_len == 1:
        out.index_copy_(0, q_starts, o.view(num_seqs, num_heads, head_dim))
    else:
        out[q_index[q_valid]] = o[q_valid]
