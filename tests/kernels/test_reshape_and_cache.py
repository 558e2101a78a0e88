"""reshape_and_cache (Triton) and reshape_and_cache_torch (CPU backend) against reshape_and_cache_ref.

Writes are copies, so every comparison is exact.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from pagedserve.kernels import reshape_and_cache, reshape_and_cache_ref, reshape_and_cache_torch

IMPLS: dict[str, Callable[..., None]] = {"triton": reshape_and_cache, "torch": reshape_and_cache_torch}


def make_inputs(
    num_tokens: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    return key, value, k_cache, v_cache


def run_and_compare(impl: Callable[..., None], key, value, k_cache, v_cache, slot_mapping) -> None:
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    reshape_and_cache_ref(key, value, k_expected, v_expected, slot_mapping)
    impl(key, value, k_cache, v_cache, slot_mapping)
    assert torch.equal(k_cache, k_expected)
    assert torch.equal(v_cache, v_expected)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("num_kv_heads", "head_dim", "block_size", "dtype"),
    [
        (1, 64, 8, torch.float32),
        (2, 80, 16, torch.bfloat16),
        (3, 96, 32, torch.float16),
        (2, 256, 128, torch.float32),
    ],
    ids=["h1-d64-b8-fp32", "h2-d80-b16-bf16", "h3-d96-b32-fp16", "h2-d256-b128-fp32"],
)
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_matches_ref_and_skips_padding(
    impl: str, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype, slot_dtype: torch.dtype
) -> None:
    num_blocks, num_tokens = 6, 9
    key, value, k_cache, v_cache = make_inputs(
        num_tokens, num_blocks, block_size, num_kv_heads, head_dim, dtype
    )
    slots = torch.randperm(num_blocks * block_size, generator=torch.Generator().manual_seed(1))[:num_tokens]
    slots[[2, 5]] = -1  # padding tokens: not cached
    before_k, before_v = k_cache.clone(), v_cache.clone()
    run_and_compare(IMPLS[impl], key, value, k_cache, v_cache, slots.to(slot_dtype))

    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    flat_k = k_cache.view(-1, num_kv_heads, head_dim)
    assert torch.equal(flat_k[slots[0]], key[0])
    assert torch.equal(flat_k[~written], before_k.view(-1, num_kv_heads, head_dim)[~written])
    assert torch.equal(
        v_cache.view(-1, num_kv_heads, head_dim)[~written],
        before_v.view(-1, num_kv_heads, head_dim)[~written],
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_all_slots_padding_writes_nothing(impl: str) -> None:
    key, value, k_cache, v_cache = make_inputs(4, 3, 8, 2, 16, torch.float32)
    before = k_cache.clone()
    IMPLS[impl](key, value, k_cache, v_cache, torch.full((4,), -1, dtype=torch.int64))
    assert torch.equal(k_cache, before)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_key_value_and_large_block_ids(impl: str) -> None:
    # key/value as slices of a fused qkv projection; slots in blocks above 2^16.
    num_blocks, block_size, num_kv_heads, head_dim = 70_000, 8, 1, 16
    k_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    qkv = torch.randn(5, 4, head_dim)
    key, value = qkv[:, 2:3], qkv[:, 3:4]
    slots = torch.tensor([69_999 * block_size + 7, 2**16 * block_size, -1, 65_537 * block_size + 3, 5])
    run_and_compare(IMPLS[impl], key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache[69_999, 7], key[0])
    assert torch.equal(v_cache[65_537, 3], value[3])


@pytest.mark.parametrize(
    "impl",
    [reshape_and_cache, reshape_and_cache_torch, reshape_and_cache_ref],
    ids=["triton", "torch", "ref"],
)
@pytest.mark.parametrize(
    "case", ["key_heads", "value_shape", "cache_dtype", "slot_length", "slot_float", "key_2d"]
)
def test_bad_arguments_raise_value_error(impl: Callable[..., None], case: str) -> None:
    key, value, k_cache, v_cache = make_inputs(4, 3, 8, 2, 16, torch.float32)
    slots = torch.arange(4)
    name, args = {
        "key_heads": ("key", (key[:, :1], value[:, :1], k_cache, v_cache, slots)),
        "value_shape": ("value", (key, value[:3], k_cache, v_cache, slots)),
        "cache_dtype": ("v_cache", (key, value, k_cache, v_cache.half(), slots)),
        "slot_length": ("slot_mapping", (key, value, k_cache, v_cache, slots[:3])),
        "slot_float": ("slot_mapping", (key, value, k_cache, v_cache, slots.float())),
        "key_2d": ("key", (key[:, 0], value[:, 0], k_cache, v_cache, slots)),
    }[case]
    with pytest.raises(ValueError, match=name):
        impl(*args)
