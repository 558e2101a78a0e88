"""Decode steps through the persistent, padded buffers CUDA graphs replay.

Without a GPU the graphs themselves cannot be captured, but everything around them runs here:
`DecodeGraphs(capture=False)` serves every decode step from the same padded buffers, run eagerly,
so greedy output must stay token-identical to transformers' `generate` while padding rows
(slot -1, context 1) write nothing and their logits are dropped.
"""

from __future__ import annotations

import pytest
import torch
from executor_harness import PROMPT_LENGTHS, VOCAB, StepDriver, make_prompts, reference_greedy

from pagedserve.executor.cuda_graphs import DecodeGraphs, batch_sizes_for
from pagedserve.executor.inputs import ScheduledSeq

MAX_NEW_TOKENS = 12


def test_batch_sizes_cover_every_batch_with_little_padding() -> None:
    assert batch_sizes_for(1) == [1]
    assert batch_sizes_for(6) == [1, 2, 4, 6]
    assert batch_sizes_for(20) == [1, 2, 4, 8, 16, 20]
    sizes = batch_sizes_for(10_000)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256
    for n in range(1, 257):
        padded = next(b for b in sizes if b >= n)
        assert padded - n <= max(7, n // 2)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_padded_decode_buffers_keep_greedy_identical_to_generate(family, tiny_model_dir, make_engine) -> None:
    path = tiny_model_dir(family)
    prompts = make_prompts(PROMPT_LENGTHS, VOCAB, seed=3)
    expected = reference_greedy(path, prompts, MAX_NEW_TOKENS)
    engine = make_engine(path, max_model_len=128)
    graphs = DecodeGraphs(engine.runner, engine.pool, 16, 128, capture=False)
    engine.runner.decode_graphs = graphs
    # staggered arrivals: decode batches of several sizes, padded up to 1, 2, 4, 8 rows
    got = StepDriver(engine, seed=1).run(prompts, MAX_NEW_TOKENS, num_chunks=2, stagger=3)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g == e, f"{family} prompt {i} (length {len(prompts[i])})"
    assert graphs.replays >= MAX_NEW_TOKENS - 2  # the decode steps went through the buffers


def test_padding_rows_write_no_kv_and_their_logits_are_dropped(tiny_model_dir, make_engine) -> None:
    engine = make_engine(tiny_model_dir("llama"), max_model_len=64)
    runner, pool = engine.runner, engine.pool
    block_size = pool.block_size
    prompts = make_prompts((5, 11, 17), VOCAB, seed=4)
    seqs = []
    next_block = 1  # block 0 is what padding rows read: leave it out of every table
    for p in prompts:
        n = -(-(len(p) + 1) // block_size)
        blocks = list(range(next_block, next_block + n))
        next_block += n
        runner.execute([ScheduledSeq(p, blocks, 0, len(p) - 1, False)], pool)  # prefill all but the last
        seqs.append(ScheduledSeq(p, blocks, len(p) - 1, 1, True))
    before = [c.clone() for c in pool.k_caches]
    eager = runner.execute(seqs, pool)  # [3, V], no padding
    graphs = DecodeGraphs(runner, pool, 8, 64, capture=False)
    runner.decode_graphs = graphs
    padded = runner.execute(seqs, pool)  # padded to 4 rows
    assert graphs.replays == 1 and padded.shape == eager.shape
    torch.testing.assert_close(padded, eager, rtol=1e-5, atol=1e-5)
    assert torch.equal(padded.argmax(-1), eager.argmax(-1))
    for layer, (k, k0) in enumerate(zip(pool.k_caches, before, strict=True)):
        assert torch.equal(k[0], k0[0]), f"layer {layer}: a padding row wrote into block 0"
    # not a decode step (a prefill chunk), or a batch above the largest size: eager as before
    assert graphs.run([ScheduledSeq(prompts[0], [1, 2], 0, 3, True)]) is None
    assert graphs.run(seqs * 3) is None and graphs.replays == 1
