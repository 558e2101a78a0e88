"""Argument checks shared by every kernel wrapper (Triton, torch backend and references).

Each check raises ``ValueError`` naming the offending tensor and its shape. Only metadata is
inspected (shape, dtype, device, strides): no check reads tensor values, so the Triton wrappers
never synchronize with the device.

Layouts checked here (see the module docstrings of the kernels for the full contract):
    key, value      [num_tokens, num_kv_heads, head_dim]
    k_cache/v_cache [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping    [num_tokens]             int64 or int32, -1 = skip
    query, out      [num_tokens, num_heads, head_dim]
    block_table     [num_seqs, max_blocks]   int32 (int64 accepted)
    seq_lens        [num_seqs]               int32 (int64 accepted)
    cu_seqlens_q    [num_seqs + 1]           int32 (int64 accepted)
    block_mapping   [num_pairs, 2]           int64 (int32 accepted), columns (src, dst)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


class AttentionDims(NamedTuple):
    num_tokens: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    num_seqs: int


def _desc(name: str, t: torch.Tensor) -> str:
    return f"{name} (shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}, stride {tuple(t.stride())})"


def check_tensor(
    name: str,
    t: object,
    ndim: int,
    dtypes: tuple[torch.dtype, ...],
    device: torch.device | None = None,
) -> torch.Tensor:
    """Checks type, rank, dtype, device and that the last dim is contiguous."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{_desc(name, t)} must have {ndim} dims")
    if t.dtype not in dtypes:
        raise ValueError(f"{_desc(name, t)} must have dtype in {[str(d) for d in dtypes]}")
    if device is not None and t.device != device:
        raise ValueError(f"{_desc(name, t)} must be on device {device}")
    if t.numel() > 0 and t.size(-1) > 1 and t.stride(-1) != 1:
        raise ValueError(f"{_desc(name, t)} must be contiguous in its last dim")
    return t


def check_kv_caches(k_cache: object, v_cache: object, device: torch.device | None = None) -> None:
    """k_cache and v_cache: same shape [num_blocks, block_size, num_kv_heads, head_dim] and dtype."""
    k = check_tensor("k_cache", k_cache, 4, FLOAT_DTYPES, device)
    v = check_tensor("v_cache", v_cache, 4, FLOAT_DTYPES, k.device)
    if v.shape != k.shape:
        raise ValueError(f"{_desc('v_cache', v)} must have the shape of k_cache {tuple(k.shape)}")
    if v.dtype != k.dtype:
        raise ValueError(f"{_desc('v_cache', v)} must have the dtype of k_cache {k.dtype}")
    block_size = k.size(1)
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"{_desc('k_cache', k)}: block_size (dim 1) must be a power of two")


def check_reshape_and_cache(
    key: object, value: object, k_cache: object, v_cache: object, slot_mapping: object
) -> None:
    k = check_tensor("key", key, 3, FLOAT_DTYPES)
    v = check_tensor("value", value, 3, FLOAT_DTYPES, k.device)
    check_kv_caches(k_cache, v_cache, k.device)
    assert isinstance(k_cache, torch.Tensor)
    if v.shape != k.shape:
        raise ValueError(f"{_desc('value', v)} must have the shape of key {tuple(k.shape)}")
    if k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(
            f"{_desc('key', k)}: [num_kv_heads, head_dim] must match k_cache {tuple(k_cache.shape)}"
        )
    if k.dtype != k_cache.dtype or v.dtype != k_cache.dtype:
        raise ValueError(f"{_desc('key', k)} and value must have the dtype of k_cache {k_cache.dtype}")
    s = check_tensor("slot_mapping", slot_mapping, 1, INDEX_DTYPES, k.device)
    if s.size(0) != k.size(0):
        raise ValueError(f"{_desc('slot_mapping', s)} must have num_tokens={k.size(0)} entries")


def check_paged_attention(
    query: object,
    k_cache: object,
    v_cache: object,
    block_table: object,
    seq_lens: object,
    cu_seqlens_q: object,
    out: object | None,
) -> AttentionDims:
    q = check_tensor("query", query, 3, FLOAT_DTYPES)
    check_kv_caches(k_cache, v_cache, q.device)
    assert isinstance(k_cache, torch.Tensor)
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim:
        raise ValueError(f"{_desc('query', q)}: head_dim must match k_cache {tuple(k_cache.shape)}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"{_desc('query', q)}: num_heads must be a multiple of num_kv_heads={num_kv_heads}")
    if q.dtype != k_cache.dtype:
        raise ValueError(f"{_desc('query', q)} must have the dtype of k_cache {k_cache.dtype}")
    bt = check_tensor("block_table", block_table, 2, INDEX_DTYPES, q.device)
    num_seqs = bt.size(0)
    sl = check_tensor("seq_lens", seq_lens, 1, INDEX_DTYPES, q.device)
    if sl.size(0) != num_seqs:
        raise ValueError(f"{_desc('seq_lens', sl)} must have num_seqs={num_seqs} entries (block_table rows)")
    cu = check_tensor("cu_seqlens_q", cu_seqlens_q, 1, INDEX_DTYPES, q.device)
    if cu.size(0) != num_seqs + 1:
        raise ValueError(f"{_desc('cu_seqlens_q', cu)} must have num_seqs+1={num_seqs + 1} entries")
    if out is not None:
        o = check_tensor("out", out, 3, FLOAT_DTYPES, q.device)
        if o.shape != q.shape or o.dtype != q.dtype:
            raise ValueError(f"{_desc('out', o)} must have the shape and dtype of query {tuple(q.shape)}")
    return AttentionDims(num_tokens, num_heads, num_kv_heads, head_dim, block_size, num_seqs)


def check_copy_blocks(k_caches: object, v_caches: object, block_mapping: object) -> None:
    if not isinstance(k_caches, (list, tuple)) or not isinstance(v_caches, (list, tuple)):
        raise ValueError("k_caches and v_caches must be lists of tensors (one per layer)")
    if len(k_caches) != len(v_caches):
        raise ValueError(f"k_caches has {len(k_caches)} layers but v_caches has {len(v_caches)}")
    first = None
    for layer, (k, v) in enumerate(zip(k_caches, v_caches, strict=True)):
        check_kv_caches(k, v, None if first is None else first.device)
        assert isinstance(k, torch.Tensor)
        if first is None:
            first = k
        elif k.shape != first.shape or k.dtype != first.dtype:
            raise ValueError(
                f"{_desc(f'k_caches[{layer}]', k)} must match k_caches[0] "
                f"(shape {tuple(first.shape)}, dtype {first.dtype})"
            )
    device = first.device if first is not None else None
    m = check_tensor("block_mapping", block_mapping, 2, INDEX_DTYPES, device)
    if m.size(1) != 2:
        raise ValueError(f"{_desc('block_mapping', m)} must have shape [num_pairs, 2] (src, dst)")
