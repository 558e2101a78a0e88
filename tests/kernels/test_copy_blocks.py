"""copy_blocks (Triton) and copy_blocks_torch (CPU backend) against copy_blocks_ref; copies are exact."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from pagedserve.kernels import copy_blocks, copy_blocks_ref, copy_blocks_torch

IMPLS: dict[str, Callable[..., None]] = {"triton": copy_blocks, "torch": copy_blocks_torch}


def make_layers(
    num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_caches = [torch.randn(shape, generator=gen).to(dtype) for _ in range(num_layers)]
    v_caches = [torch.randn(shape, generator=gen).to(dtype) for _ in range(num_layers)]
    return k_caches, v_caches


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("block_size", "num_kv_heads", "head_dim", "dtype"),
    [(8, 2, 64, torch.float32), (16, 1, 80, torch.bfloat16), (128, 2, 256, torch.float16)],
    ids=["b8-h2-d64-fp32", "b16-h1-d80-bf16", "b128-h2-d256-fp16"],
)
@pytest.mark.parametrize("map_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_matches_ref_in_every_layer(
    impl: str, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, map_dtype: torch.dtype
) -> None:
    k_caches, v_caches = make_layers(3, 10, block_size, num_kv_heads, head_dim, dtype)
    mapping = torch.tensor([[1, 5], [2, 7], [9, 0], [1, 3]], dtype=map_dtype)  # one source, two copies
    k_expected = [c.clone() for c in k_caches]
    v_expected = [c.clone() for c in v_caches]
    copy_blocks_ref(k_expected, v_expected, mapping)
    IMPLS[impl](k_caches, v_caches, mapping)
    for got, expected in zip([*k_caches, *v_caches], [*k_expected, *v_expected], strict=True):
        assert torch.equal(got, expected)
    assert torch.equal(k_caches[2][3], k_caches[2][1]) and torch.equal(v_caches[0][0], v_caches[0][9])


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_pool_and_large_block_ids(impl: str) -> None:
    # Each layer's k and v are views into one [2, num_blocks, ...] allocation; ids above 2^16.
    num_blocks = 70_000
    pools = [torch.randn(2, num_blocks, 8, 1, 16) for _ in range(2)]
    k_caches, v_caches = [p[0] for p in pools], [p[1] for p in pools]
    mapping = torch.tensor([[69_999, 2**16], [3, 65_537]])
    IMPLS[impl](k_caches, v_caches, mapping)
    for cache in (*k_caches, *v_caches):
        assert torch.equal(cache[2**16], cache[69_999]) and torch.equal(cache[65_537], cache[3])


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_mapping_is_a_no_op(impl: str) -> None:
    k_caches, v_caches = make_layers(2, 4, 8, 1, 16, torch.float32)
    before = [c.clone() for c in (*k_caches, *v_caches)]
    IMPLS[impl](k_caches, v_caches, torch.empty(0, 2, dtype=torch.int64))
    assert all(torch.equal(a, b) for a, b in zip(before, (*k_caches, *v_caches), strict=True))


@pytest.mark.parametrize(
    "impl", [copy_blocks, copy_blocks_torch, copy_blocks_ref], ids=["triton", "torch", "ref"]
)
@pytest.mark.parametrize("case", ["mapping_shape", "mapping_float", "layer_count", "layer_shape", "v_dtype"])
def test_bad_arguments_raise_value_error(impl: Callable[..., None], case: str) -> None:
    k_caches, v_caches = make_layers(2, 4, 8, 1, 16, torch.float32)
    mapping = torch.tensor([[0, 1]])
    name, args = {
        "mapping_shape": ("block_mapping", (k_caches, v_caches, torch.tensor([0, 1]))),
        "mapping_float": ("block_mapping", (k_caches, v_caches, mapping.float())),
        "layer_count": ("v_caches", (k_caches, v_caches[:1], mapping)),
        "layer_shape": (
            "k_caches",
            (k_caches[:1] + [k_caches[1][:, :4]], v_caches[:1] + [v_caches[1][:, :4]], mapping),
        ),
        "v_dtype": ("v_cache", (k_caches, [v_caches[0].half(), v_caches[1]], mapping)),
    }[case]
    with pytest.raises(ValueError, match=name):
        impl(*args)
