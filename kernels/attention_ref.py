"""The reference for attention over the paged KV pool (layouts in `paged_attention`): what the
Triton kernel and the CPU torch backend are both tested against, one sequence at a time in fp32.
Plain torch: it needs no triton."""

from __future__ import annotations

import torch

from ._checks import check_paged_attention


def paged_attention_ref(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference: one sequence at a time, in fp32, with an explicit softmax."""
    dims = check_paged_attention(query, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, out)
    if out is None:
        out = torch.empty_like(query)
    group = dims.num_heads // dims.num_kv_heads
    cu = cu_seqlens_q.tolist()
    for seq, seq_len in enumerate(seq_lens.tolist()):
        q_start, q_end = cu[seq], cu[seq + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        num_blocks = -(-seq_len // dims.block_size)
        blocks = block_table[seq, :num_blocks].long()
        k = k_cache[blocks].flatten(0, 1)[:seq_len].float().repeat_interleave(group, dim=1)  # [L, H, D]
        v = v_cache[blocks].flatten(0, 1)[:seq_len].float().repeat_interleave(group, dim=1)  # [L, H, D]
        q = query[q_start:q_end].float()  # [q_len, H, D]
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale  # [H, q_len, L]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
        causal = torch.arange(seq_len, device=query.device)[None, :] <= q_pos[:, None]  # [q_len, L]
        probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        out[q_start:q_end] = torch.einsum("hqk,khd->qhd", probs, v).to(out.dtype)
    return out
