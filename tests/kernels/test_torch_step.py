"""TorchAttentionStep: the per-step plan, reused by every layer, gives what the per-call functions give."""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels import (
    get_attention_backend,
    paged_attention_ref,
    paged_attention_torch,
    reshape_and_cache_torch,
)
from pagedserve.kernels.backends import KernelStep
from pagedserve.kernels.torch_attention import AttentionPlan
from pagedserve.kernels.torch_backend import TorchAttentionStep

MIXED = ([1, 7, 1, 3, 12, 1], [9, 7, 33, 20, 12, 150])  # decodes at non-adjacent tokens
DECODES = ([1, 1, 1], [17, 3, 40])  # decodes back to back: the slice path


@pytest.mark.parametrize("lens", [MIXED, DECODES], ids=["mixed", "decodes"])
@pytest.mark.parametrize("gqa", [1, 3])
def test_one_plan_serves_every_layer(paged_batch, lens: tuple[list[int], list[int]], gqa: int) -> None:
    # Three "layers": one step layout, each layer its own pool values and queries (NaN outside every
    # context stays NaN); one step object must give what the per-call path gives in each.
    first = paged_batch(
        *lens, num_heads=2 * gqa, num_kv_heads=2, head_dim=16, block_size=8, dtype=torch.float32
    )
    step = TorchAttentionStep(
        torch.empty(0, dtype=torch.int64), first.block_table, first.seq_lens, first.cu_seqlens_q, 8
    )
    for layer in range(3):
        batch = first._replace(
            query=first.query.flip(0) * (layer + 1),
            k_cache=first.k_cache.flip(-1) - layer,
            v_cache=first.v_cache * (layer + 2),
        )
        expected = paged_attention_torch(*batch.args(), 0.3)
        out = torch.full_like(batch.query, float("nan"))
        step.attend(batch.query, batch.k_cache, batch.v_cache, 0.3, out)
        assert torch.equal(out, expected)


def test_decode_plan_uses_a_slice_only_for_adjacent_tokens(paged_batch) -> None:
    mixed = paged_batch(*MIXED, num_heads=2, num_kv_heads=1, head_dim=8, block_size=8, dtype=torch.float32)
    decodes = paged_batch(
        *DECODES, num_heads=2, num_kv_heads=1, head_dim=8, block_size=8, dtype=torch.float32
    )
    mixed_plan = AttentionPlan(mixed.block_table, mixed.seq_lens, mixed.cu_seqlens_q, 8)
    decode_plan = AttentionPlan(decodes.block_table, decodes.seq_lens, decodes.cu_seqlens_q, 8)
    assert [g.decode for g in mixed_plan.groups] == [True, False]
    assert mixed_plan.groups[0].token_slice is None
    assert [g.decode for g in decode_plan.groups] == [True]
    assert decode_plan.groups[0].token_slice == slice(0, 3)


@pytest.mark.parametrize("skip", [False, True], ids=["all_slots", "with_skipped"])
def test_write_kv_matches_reshape_and_cache(skip: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(5, 4, 2, 8, generator=gen)
    v_cache = torch.randn(5, 4, 2, 8, generator=gen)
    key = torch.randn(6, 2, 8, generator=gen)
    value = torch.randn(6, 2, 8, generator=gen)
    slots = torch.tensor([3, 17, 0, 9, 19, 4])
    if skip:
        slots[[1, 4]] = -1
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    reshape_and_cache_torch(key, value, expected_k, expected_v, slots)
    empty = torch.zeros(0, dtype=torch.int32)
    step = TorchAttentionStep(slots, empty.view(0, 1), empty, torch.zeros(1, dtype=torch.int32), 4)
    step.write_kv(key, value, k_cache, v_cache)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def test_prepare_step_picks_the_backends_step(paged_batch) -> None:
    batch = paged_batch(*MIXED, num_heads=2, num_kv_heads=1, head_dim=8, block_size=8, dtype=torch.float32)
    slots = torch.arange(batch.query.size(0))
    torch_step = get_attention_backend("torch", "cpu").prepare_step(slots, *batch.args()[3:], 8)
    triton_step = get_attention_backend("triton", "cpu").prepare_step(slots, *batch.args()[3:], 8)
    assert isinstance(torch_step, TorchAttentionStep)
    assert isinstance(triton_step, KernelStep)


def test_decodes_of_very_different_lengths_are_bucketed(paged_batch) -> None:
    # Two long contexts among short ones: the short ones get their own, shorter padded group, and
    # the result still matches the reference (NaN outside every context would show).
    seq_lens = [300, 20, 25, 30, 280, 16, 40, 22, 35, 18]
    batch = paged_batch(
        [1] * len(seq_lens),
        seq_lens,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        block_size=8,
        dtype=torch.float32,
    )
    plan = AttentionPlan(batch.block_table, batch.seq_lens, batch.cu_seqlens_q, 8)
    assert [(g.num_seqs, g.kv_len) for g in plan.groups] == [(2, 304), (8, 40)]
    assert all(g.token_slice is None for g in plan.groups)
    out = torch.empty_like(batch.query)
    plan.attend(batch.query, batch.k_cache, batch.v_cache, 0.25, out)
    torch.testing.assert_close(out, paged_attention_ref(*batch.args(), 0.25), atol=2e-5, rtol=1e-5)


def test_close_lengths_stay_one_group_in_order(paged_batch) -> None:
    batch = paged_batch(
        [1] * 6,
        [40, 33, 38, 45, 36, 41],
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        block_size=8,
        dtype=torch.float32,
    )
    plan = AttentionPlan(batch.block_table, batch.seq_lens, batch.cu_seqlens_q, 8)
    assert len(plan.groups) == 1 and plan.groups[0].token_slice == slice(0, 6)


@pytest.mark.parametrize("gqa", [1, 2])
def test_prefills_of_spread_lengths_are_attended_one_by_one(paged_batch, gqa: int) -> None:
    # Whole prompts of 5-200 tokens and chunks after cached context: padded to one group they would
    # do several times the work, so each is attended alone (causal, or bottom-right masked after
    # cached context); decodes ride along. NaN outside every context would show.
    q_lens = [200, 5, 1, 64, 17, 30, 1]
    seq_lens = [200, 5, 90, 64, 150, 230, 40]
    batch = paged_batch(
        q_lens, seq_lens, num_heads=2 * gqa, num_kv_heads=2, head_dim=16, block_size=8, dtype=torch.float32
    )
    plan = AttentionPlan(batch.block_table, batch.seq_lens, batch.cu_seqlens_q, 8)
    assert plan.other_groups == []
    assert [(p.q_len, p.seq_len, p.mask is None) for p in plan.each] == [
        (200, 200, True), (5, 5, True), (64, 64, True), (17, 150, False), (30, 230, False)
    ]  # fmt: skip
    out = torch.full_like(batch.query, float("nan"))
    plan.attend(batch.query, batch.k_cache, batch.v_cache, 0.25, out)
    torch.testing.assert_close(out, paged_attention_ref(*batch.args(), 0.25), atol=2e-5, rtol=1e-5)


def test_small_or_even_prefills_stay_one_group(paged_batch) -> None:
    for q_lens, seq_lens in (([3, 7, 2], [3, 40, 2]), ([64, 64, 60], [64, 64, 60])):
        batch = paged_batch(
            q_lens, seq_lens, num_heads=2, num_kv_heads=1, head_dim=8, block_size=8, dtype=torch.float32
        )
        plan = AttentionPlan(batch.block_table, batch.seq_lens, batch.cu_seqlens_q, 8)
        assert plan.each == [] and len(plan.other_groups) == 1
