"""paged_attention (Triton) and paged_attention_torch (CPU backend) against paged_attention_ref.

Pools are NaN outside every context, block tables are shuffled and padded with -1, and batches mix
decodes, whole prompts and chunked prefills, so a read of the wrong slot, of a padding entry or past
a context shows as NaN or as a mismatch. The Triton cases run under TRITON_INTERPRET=1 on CPU, so
they take a lean grid that covers each axis (GQA ratio, head_dim, block size, dtype) rather than
the full product; the torch backend is fast and takes the full product.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
import torch

from pagedserve.kernels import paged_attention, paged_attention_ref, paged_attention_torch, torch_attention

# Output vs the fp32 reference (computed from the same low-precision inputs, rounded once at the end).
# bf16/fp16 kernels also round the softmax probabilities to the cache dtype before P @ V.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 2e-5, "rtol": 1e-5},
    torch.float16: {"atol": 4e-3, "rtol": 4e-3},
    torch.bfloat16: {"atol": 3e-2, "rtol": 2e-2},
}

NUM_KV_HEADS = 2
# (q_lens, seq_lens): decode with context, whole prompt, decode, chunked prefill, whole prompt, and a
# decode whose context spans several of the Triton kernel's KV tiles (online-softmax rescaling).
MIXED = ([1, 7, 1, 3, 12, 1], [9, 7, 33, 20, 12, 150])
BATCH_KINDS = {
    "decode": ([1, 1, 1, 1], [1, 17, 40, 8]),
    "prompts_unequal": ([5, 9], [5, 9]),
    "prompts_equal": ([6, 6, 6], [6, 6, 6]),  # the torch backend's is_causal path
    "chunked_prefill": ([4, 2, 16], [20, 9, 140]),
}


def case_id(value: object) -> str | None:
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else None


Impl = Callable[..., torch.Tensor]
IMPLS: dict[str, Impl] = {"triton": paged_attention, "torch": paged_attention_torch}


def check_against_ref(impl: Impl, batch, dtype: torch.dtype) -> None:
    scale = batch.query.size(-1) ** -0.5
    expected = paged_attention_ref(*batch.args(), scale)
    got = impl(*batch.args(), scale)
    assert got.dtype == batch.query.dtype and got.shape == batch.query.shape
    torch.testing.assert_close(got.float(), expected.float(), **TOLERANCES[dtype])


TRITON_CASES = [
    # (queries per kv head, head_dim, block_size, dtype): every value of every axis at least once.
    (1, 64, 16, torch.float32),
    (4, 80, 8, torch.bfloat16),
    (7, 64, 32, torch.float16),
    (7, 80, 8, torch.float32),
    (4, 64, 32, torch.float32),
    (1, 80, 16, torch.float16),
    (4, 64, 16, torch.bfloat16),
]


@pytest.mark.parametrize(("gqa", "head_dim", "block_size", "dtype"), TRITON_CASES, ids=case_id)
def test_triton_mixed_batch(
    paged_batch, gqa: int, head_dim: int, block_size: int, dtype: torch.dtype
) -> None:
    batch = paged_batch(
        *MIXED,
        num_heads=gqa * NUM_KV_HEADS,
        num_kv_heads=NUM_KV_HEADS,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
    )
    check_against_ref(paged_attention, batch, dtype)


@pytest.mark.parametrize("gqa", [1, 4, 7])
@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=case_id)
def test_torch_mixed_batch(paged_batch, gqa: int, head_dim: int, block_size: int, dtype: torch.dtype) -> None:
    batch = paged_batch(
        *MIXED,
        num_heads=gqa * NUM_KV_HEADS,
        num_kv_heads=NUM_KV_HEADS,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
    )
    check_against_ref(paged_attention_torch, batch, dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", BATCH_KINDS)
def test_batch_kinds(paged_batch, impl: str, kind: str) -> None:
    batch = paged_batch(
        *BATCH_KINDS[kind], num_heads=8, num_kv_heads=2, head_dim=64, block_size=8, dtype=torch.float32
    )
    check_against_ref(IMPLS[impl], batch, torch.float32)


@pytest.mark.parametrize(
    ("impl", "gqa", "head_dim", "block_size", "dtype"),
    [
        ("triton", 2, 256, 128, torch.bfloat16),
        ("triton", 3, 96, 64, torch.float16),
        ("torch", 2, 256, 128, torch.bfloat16),
        ("torch", 3, 96, 64, torch.float16),
    ],
    ids=case_id,
)
def test_large_blocks_and_heads(
    paged_batch, impl: str, gqa: int, head_dim: int, block_size: int, dtype: torch.dtype
) -> None:
    batch = paged_batch(
        [1, 5, 2],
        [130, 5, 70],
        num_heads=gqa,
        num_kv_heads=1,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
    )
    check_against_ref(IMPLS[impl], batch, dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_block_ids_above_2_16(paged_batch, impl: str) -> None:
    # 70000 blocks, every sequence's blocks drawn from ids >= 2^16: catches narrow index arithmetic.
    batch = paged_batch(
        [1, 6, 2],
        [30, 6, 19],
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        block_size=8,
        dtype=torch.float32,
        num_blocks=70_000,
        first_block_id=2**16,
    )
    assert int(batch.block_table.max()) >= 2**16
    check_against_ref(IMPLS[impl], batch, torch.float32)


@pytest.mark.parametrize(
    ("impl", "table_padding"), [("triton", -1), ("triton", 0), ("torch", 0), ("torch", 2**31 - 1)]
)
def test_block_table_padding_is_never_read(paged_batch, impl: str, table_padding: int) -> None:
    batch = paged_batch(
        *MIXED,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        block_size=8,
        dtype=torch.float32,
        extra_table_columns=4,
        table_padding=table_padding,
    )
    check_against_ref(IMPLS[impl], batch, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_query_and_out(paged_batch, impl: str) -> None:
    # query as a slice of a fused qkv projection, out as a slice of a wider buffer.
    batch = paged_batch(*MIXED, num_heads=4, num_kv_heads=2, head_dim=32, block_size=16, dtype=torch.float32)
    num_tokens = batch.query.size(0)
    qkv = torch.randn(num_tokens, 8, 32)
    qkv[:, :4] = batch.query
    query = qkv[:, :4]
    out_buffer = torch.full((num_tokens, 6, 32), 7.0)
    out = out_buffer[:, 1:5]
    scale = 32**-0.5
    args = (query, *batch.args()[1:])
    result = IMPLS[impl](*args, scale, out=out)
    assert result.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, paged_attention_ref(*batch.args(), scale), **TOLERANCES[torch.float32])
    assert bool((out_buffer[:, 0] == 7.0).all()) and bool((out_buffer[:, 5] == 7.0).all())


@pytest.mark.parametrize(
    ("kind", "num_splits", "dtype"),
    [("decode", 2, torch.float32), ("decode", 5, torch.bfloat16), ("mixed", 3, torch.float16)],
    ids=case_id,
)
def test_triton_split_context(paged_batch, kind: str, num_splits: int, dtype: torch.dtype) -> None:
    # Each context in num_splits parts, combined after: parts of one tile, of several, and empty
    # ones (a context of 1 in 5 parts); out poisoned, so every row must be written by the combine.
    # parts are whole 64-position tiles: contexts past 64 * num_splits split everywhere
    q_lens, seq_lens = ([1, 1, 1, 1], [1, 65, 200, 333]) if kind == "decode" else MIXED
    batch = paged_batch(q_lens, seq_lens, num_heads=8, num_kv_heads=2, head_dim=64, block_size=8, dtype=dtype)
    scale = 64**-0.5
    out = torch.full_like(batch.query, float("nan"))
    paged_attention(*batch.args(), scale, out=out, num_splits=num_splits)
    expected = paged_attention_ref(*batch.args(), scale)
    torch.testing.assert_close(out.float(), expected.float(), **TOLERANCES[dtype])


def test_split_count_follows_the_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    module = importlib.import_module("pagedserve.kernels.paged_attention")  # the package exports the function
    monkeypatch.setattr(module, "_multiprocessors", lambda index: 132)
    cuda = torch.device("cuda", 0)
    assert module.default_num_splits(4, 2048, cuda) == module.MAX_SPLITS  # batch 1, 4 KV heads
    assert module.default_num_splits(4, 528, cuda) == 4  # no part under MIN_SPLIT_TOKENS
    assert module.default_num_splits(128, 2048, cuda) == 3  # batch 32
    assert module.default_num_splits(1024, 2048, cuda) == 1  # batch 256: the grid fills the card
    assert module.default_num_splits(4, 100, cuda) == 1
    assert module.default_num_splits(4, 2048, torch.device("cpu")) == 1


def test_decode_steps_split_only_where_asked(paged_batch, monkeypatch: pytest.MonkeyPatch) -> None:
    # what CUDA graphs capture under (splitting_decode_contexts) splits; an eager launch does not
    from pagedserve.kernels.backends import splitting_decode_contexts

    module = importlib.import_module("pagedserve.kernels.paged_attention")
    asked = []
    monkeypatch.setattr(module, "default_num_splits", lambda *args: asked.append(args) or 3)
    decode = paged_batch(
        [1, 1], [200, 90], num_heads=4, num_kv_heads=2, head_dim=32, block_size=8, dtype=torch.float32
    )
    prefill = paged_batch([5, 1], [200, 90], num_heads=4, num_kv_heads=2, head_dim=32, block_size=8, dtype=torch.float32)  # fmt: skip
    check_against_ref(paged_attention, decode, torch.float32)
    assert asked == []
    with splitting_decode_contexts():
        check_against_ref(paged_attention, decode, torch.float32)
        assert len(asked) == 1 and asked[0][1] == decode.block_table.size(1) * 8  # the table's reach
        check_against_ref(paged_attention, prefill, torch.float32)  # not a decode step: whole
        assert len(asked) == 1
    check_against_ref(paged_attention, decode, torch.float32)
    assert len(asked) == 1


def test_torch_backend_reuses_workspace_safely(paged_batch) -> None:
    # A big call then a small one: the small one must not see the big one's leftovers.
    big = paged_batch(
        [1, 1], [200, 150], num_heads=4, num_kv_heads=2, head_dim=32, block_size=8, dtype=torch.float32
    )
    small = paged_batch(
        [1, 3], [5, 3], num_heads=4, num_kv_heads=2, head_dim=32, block_size=8, dtype=torch.float32
    )
    check_against_ref(paged_attention_torch, big, torch.float32)
    check_against_ref(paged_attention_torch, small, torch.float32)


def _bad_args(batch, case: str) -> tuple[str, tuple]:
    """Returns (name of the offending tensor, arguments with that tensor broken)."""
    q, k, v, table, seq_lens, cu = batch.args()
    if case == "query_2d":
        return "query", (q[:, 0], k, v, table, seq_lens, cu)
    if case == "query_head_dim":
        return "query", (q[..., :8], k, v, table, seq_lens, cu)
    if case == "heads_not_multiple":
        return "query", (q[:, :3], k, v, table, seq_lens, cu)
    if case == "query_dtype":
        return "query", (q.half(), k, v, table, seq_lens, cu)
    if case == "query_last_dim_strided":
        return "query", (q.transpose(0, 2).contiguous().transpose(0, 2), k, v, table, seq_lens, cu)
    if case == "v_cache_shape":
        return "v_cache", (q, k, v[:, :4], table, seq_lens, cu)
    if case == "k_cache_block_size":
        return "k_cache", (q, k[:, :6], v[:, :6], table, seq_lens, cu)
    if case == "k_cache_device":
        return "k_cache", (q, k.to("meta"), v.to("meta"), table, seq_lens, cu)
    if case == "block_table_dtype":
        return "block_table", (q, k, v, table.float(), seq_lens, cu)
    if case == "seq_lens_length":
        return "seq_lens", (q, k, v, table, seq_lens[:-1], cu)
    if case == "cu_seqlens_q_length":
        return "cu_seqlens_q", (q, k, v, table, seq_lens, cu[:-1])
    raise AssertionError(case)


BAD_CASES = [
    "query_2d",
    "query_head_dim",
    "heads_not_multiple",
    "query_dtype",
    "query_last_dim_strided",
    "v_cache_shape",
    "k_cache_block_size",
    "k_cache_device",
    "block_table_dtype",
    "seq_lens_length",
    "cu_seqlens_q_length",
]


@pytest.mark.parametrize(
    "impl", [paged_attention, paged_attention_torch, paged_attention_ref], ids=["triton", "torch", "ref"]
)
@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_arguments_raise_value_error(paged_batch, impl: Impl, case: str) -> None:
    batch = paged_batch(*MIXED, num_heads=4, num_kv_heads=2, head_dim=16, block_size=8, dtype=torch.float32)
    name, args = _bad_args(batch, case)
    with pytest.raises(ValueError, match=name):
        impl(*args, 0.25)


@pytest.mark.parametrize("impl", [paged_attention, paged_attention_torch], ids=["triton", "torch"])
def test_bad_out_raises_value_error(paged_batch, impl: Impl) -> None:
    batch = paged_batch(*MIXED, num_heads=4, num_kv_heads=2, head_dim=16, block_size=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="out"):
        impl(*batch.args(), 0.25, out=torch.empty(3, 4, 16))
    with pytest.raises(ValueError, match="out"):
        impl(*batch.args(), 0.25, out=torch.empty_like(batch.query, dtype=torch.float16))


def test_torch_backend_inside_and_outside_inference_mode(
    paged_batch, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The workspace first allocated under inference_mode must stay writable outside it.
    monkeypatch.setattr(torch_attention, "_workspace", torch_attention._Workspace())
    batch = paged_batch(
        [1, 3], [9, 3], num_heads=4, num_kv_heads=2, head_dim=16, block_size=8, dtype=torch.float32
    )
    with torch.inference_mode():
        inside = paged_attention_torch(*batch.args(), 0.25)
    outside = paged_attention_torch(*batch.args(), 0.25)
    assert torch.equal(inside, outside)
