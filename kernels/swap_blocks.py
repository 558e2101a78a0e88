"""Move whole KV blocks between the device pool and the CPU swap space, every layer at once.

Layouts (the executor's pool and its swap space share one per-block layout):
    src_kv, dst_kv   [2, num_layers, num_blocks, block_size, num_kv_heads, head_dim]: K then V of
                     every layer stacked, one tensor per side; the two sides may live on different
                     devices and hold different numbers of blocks, but agree on every other dim
                     and on dtype
    block_mapping    [num_pairs, 2] int64, rows (src block, dst block); destinations distinct

`swap_blocks` gathers every source block of every layer with one index_select on the source's
device, makes one transfer, and scatters with one index_copy_ on the destination's device: a
handful of launches per direction, whatever the number of layers or pairs. `swap_blocks_ref` is
the reference: one block and one layer at a time.
"""

from __future__ import annotations

import torch


def _check(src_kv: torch.Tensor, dst_kv: torch.Tensor, block_mapping: torch.Tensor) -> None:
    if src_kv.dim() != 6 or dst_kv.dim() != 6 or src_kv.size(0) != 2:
        raise ValueError(
            f"src_kv {tuple(src_kv.shape)} and dst_kv {tuple(dst_kv.shape)} must be "
            "[2, num_layers, num_blocks, block_size, num_kv_heads, head_dim]"
        )
    if src_kv.shape[:2] != dst_kv.shape[:2] or src_kv.shape[3:] != dst_kv.shape[3:]:
        raise ValueError(
            f"src_kv {tuple(src_kv.shape)} and dst_kv {tuple(dst_kv.shape)} differ beyond num_blocks"
        )
    if src_kv.dtype != dst_kv.dtype:
        raise ValueError(f"src_kv is {src_kv.dtype} but dst_kv is {dst_kv.dtype}")
    if block_mapping.dim() != 2 or block_mapping.size(1) != 2:
        raise ValueError(f"block_mapping must be [num_pairs, 2], got {tuple(block_mapping.shape)}")


def swap_blocks(src_kv: torch.Tensor, dst_kv: torch.Tensor, block_mapping: torch.Tensor) -> None:
    """dst_kv[:, :, dst] = src_kv[:, :, src] for every (src, dst) row of block_mapping."""
    _check(src_kv, dst_kv, block_mapping)
    if block_mapping.size(0) == 0:
        return
    mapping = block_mapping.to(dtype=torch.int64)
    src = mapping[:, 0].to(src_kv.device)  # [n]
    dst = mapping[:, 1].to(dst_kv.device)  # [n]
    moved = src_kv.index_select(2, src)  # [2, L, n, bs, Hkv, D] on the source's device
    if dst_kv.device.type == "cpu":
        # Blocking: the CPU scatter below must not read the buffer before the download lands.
        dst_kv.index_copy_(2, dst, moved.cpu())
        return
    if not moved.is_cuda:
        moved = moved.pin_memory()  # a page-locked staging buffer: the upload runs asynchronously
    # The scatter is queued on the same stream as the upload, so it runs after it.
    dst_kv.index_copy_(2, dst, moved.to(dst_kv.device, non_blocking=True))


def swap_blocks_ref(src_kv: torch.Tensor, dst_kv: torch.Tensor, block_mapping: torch.Tensor) -> None:
    """Reference: one pair and one layer at a time."""
    _check(src_kv, dst_kv, block_mapping)
    for s, d in block_mapping.tolist():
        for kv in range(2):
            for layer in range(src_kv.size(1)):
                dst_kv[kv, layer, d] = src_kv[kv, layer, s].to(dst_kv.device)
