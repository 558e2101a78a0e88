"""Copy whole KV-pool blocks (copy-on-write of shared prefix blocks), in every layer at once.

Layouts:
    k_caches[l], v_caches[l]  [num_blocks, block_size, num_kv_heads, head_dim], one per layer, all
                              with the same shape, dtype, device and strides; each block must be
                              compact (the inner three dims contiguous), blocks may be strided
    block_mapping             [num_pairs, 2] int64 (int32 accepted), rows (src, dst)

Destinations must be distinct and must not also be sources; the copies of different pairs run in
parallel. `copy_blocks` is the Triton kernel: one launch for all layers, a program per
(cache tensor, pair, chunk of the block), the cache tensors reached through a table of their data
pointers. `copy_blocks_ref` is the pure-torch reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._checks import check_copy_blocks


@triton.jit
def _copy_blocks_kernel(
    cache_ptrs_ptr,  # [2 * num_layers] int64: data pointer of every k_cache, then every v_cache
    dtype_ptr,  # any cache tensor; only its element type is used
    block_mapping_ptr,  # [num_pairs, 2]
    stride_map: tl.int64,  # elements between rows of block_mapping
    stride_block: tl.int64,  # elements between blocks of a cache
    block_numel: tl.int64,  # block_size * num_kv_heads * head_dim
    CHUNK: tl.constexpr,  # elements copied per program
):
    cache_idx = tl.program_id(0)
    pair = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(2).to(tl.int64)
    cache_ptr = tl.load(cache_ptrs_ptr + cache_idx).to(dtype_ptr.dtype)
    src = tl.load(block_mapping_ptr + pair * stride_map).to(tl.int64)
    dst = tl.load(block_mapping_ptr + pair * stride_map + 1).to(tl.int64)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = offs < block_numel
    data = tl.load(cache_ptr + src * stride_block + offs, mask=mask)
    tl.store(cache_ptr + dst * stride_block + offs, data, mask=mask)


def copy_blocks(
    k_caches: list[torch.Tensor],
    v_caches: list[torch.Tensor],
    block_mapping: torch.Tensor,
) -> None:
    """Copies block src to block dst for every (src, dst) row of block_mapping, in every layer."""
    check_copy_blocks(k_caches, v_caches, block_mapping)
    if not k_caches or block_mapping.size(0) == 0:
        return
    first = k_caches[0]
    _, block_size, num_kv_heads, head_dim = first.shape
    compact = (num_kv_heads * head_dim, head_dim, 1)
    for name, caches in (("k_caches", k_caches), ("v_caches", v_caches)):
        for layer, cache in enumerate(caches):
            if cache.stride()[1:] != compact or cache.stride(0) != first.stride(0):
                raise ValueError(
                    f"{name}[{layer}] (shape {tuple(cache.shape)}, stride {cache.stride()}) must have "
                    f"compact blocks and the strides of k_caches[0] {first.stride()}"
                )
    caches = [*k_caches, *v_caches]
    cache_ptrs = torch.tensor([c.data_ptr() for c in caches], dtype=torch.int64, device=first.device)
    block_numel = block_size * num_kv_heads * head_dim
    chunk = min(4096, triton.next_power_of_2(block_numel))
    grid = (len(caches), block_mapping.size(0), triton.cdiv(block_numel, chunk))
    _copy_blocks_kernel[grid](
        cache_ptrs,
        first,
        block_mapping,
        block_mapping.stride(0),
        first.stride(0),
        block_numel,
        CHUNK=chunk,
    )


def copy_blocks_ref(
    k_caches: list[torch.Tensor],
    v_caches: list[torch.Tensor],
    block_mapping: torch.Tensor,
) -> None:
    """Reference: one pair and one layer at a time."""
    check_copy_blocks(k_caches, v_caches, block_mapping)
    for src, dst in block_mapping.tolist():
        for cache in (*k_caches, *v_caches):
            cache[dst] = cache[src]
