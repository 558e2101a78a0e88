"""Write new tokens' keys and values into the paged KV pool.

Layouts:
    key, value      [num_tokens, num_kv_heads, head_dim]
    k_cache/v_cache [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping    [num_tokens]  int64 (int32 accepted); slot = block_id * block_size + offset;
                    slot -1 means "do not cache this token" (padding) and is skipped.

`reshape_and_cache` is the Triton kernel (one program per token, writing all its KV heads);
`reshape_and_cache_ref` is the pure-torch reference it is tested against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_reshape_and_cache


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens]
    stride_key_t: tl.int64,
    stride_key_h: tl.int64,
    stride_value_t: tl.int64,
    stride_value_h: tl.int64,
    stride_cache_b: tl.int64,
    stride_cache_s: tl.int64,
    stride_cache_h: tl.int64,
    num_kv_heads: tl.int32,
    head_dim: tl.int32,
    BLOCK_SIZE: tl.constexpr,
    HEADS_PADDED: tl.constexpr,
    HEAD_DIM_PADDED: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block_id = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE

    offs_h = tl.arange(0, HEADS_PADDED)
    offs_d = tl.arange(0, HEAD_DIM_PADDED)
    mask = (offs_h[:, None] < num_kv_heads) & (offs_d[None, :] < head_dim)  # [H, D]

    key = tl.load(
        key_ptr + token * stride_key_t + offs_h[:, None] * stride_key_h + offs_d[None, :], mask=mask
    )
    value = tl.load(
        value_ptr + token * stride_value_t + offs_h[:, None] * stride_value_h + offs_d[None, :], mask=mask
    )
    cache_offs = block_id * stride_cache_b + offset * stride_cache_s + offs_h[:, None] * stride_cache_h
    tl.store(k_cache_ptr + cache_offs + offs_d[None, :], key, mask=mask)
    tl.store(v_cache_ptr + cache_offs + offs_d[None, :], value, mask=mask)


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Writes key/value token i into slot slot_mapping[i] of k_cache/v_cache; slot -1 is skipped."""
    check_reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)
    if k_cache.stride() != v_cache.stride():
        raise ValueError(
            f"v_cache (shape {tuple(v_cache.shape)}, stride {v_cache.stride()}) must have the strides "
            f"of k_cache {k_cache.stride()}"
        )
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _reshape_and_cache_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        num_kv_heads,
        head_dim,
        BLOCK_SIZE=k_cache.size(1),
        HEADS_PADDED=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM_PADDED=triton.next_power_of_2(head_dim),
    )


def reshape_and_cache_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Reference: one token at a time."""
    check_reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)
    block_size = k_cache.size(1)
    for token, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        k_cache[slot // block_size, slot % block_size] = key[token]
        v_cache[slot // block_size, slot % block_size] = value[token]
