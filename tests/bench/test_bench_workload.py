"""Workloads are seeded and exact; the scheduler-accounting scenarios give the expected orderings."""

from __future__ import annotations

import json
import statistics

from pagedserve.bench.accounting import capacity, sharing
from pagedserve.bench.workload import (
    alpaca_like,
    arrival_times,
    fixed_lengths,
    from_jsonl,
    shared_prefix,
    sharegpt_like,
)
from pagedserve.common.models import default_model


def test_sharegpt_like_is_seeded_and_bounded() -> None:
    a = sharegpt_like(50, vocab_size=4096, max_model_len=256, seed=3)
    assert a == sharegpt_like(50, vocab_size=4096, max_model_len=256, seed=3)
    assert a != sharegpt_like(50, vocab_size=4096, max_model_len=256, seed=4)
    for r in a:
        assert 4 <= len(r.prompt_token_ids) <= 128
        assert 2 <= r.output_len and len(r.prompt_token_ids) + r.output_len <= 256
        assert all(3 <= t < 4096 for t in r.prompt_token_ids)


def test_alpaca_like_is_seeded_short_and_bounded() -> None:
    a = alpaca_like(200, vocab_size=4096, seed=3)
    assert a == alpaca_like(200, vocab_size=4096, seed=3) != alpaca_like(200, vocab_size=4096, seed=4)
    prompts = [len(r.prompt_token_ids) for r in a]
    outputs = [r.output_len for r in a]
    assert all(4 <= p <= 96 for p in prompts) and all(8 <= o <= 128 for o in outputs)
    assert 16 <= statistics.median(prompts) <= 24 and 50 <= statistics.median(outputs) <= 70
    assert len(set(prompts)) > 10  # spread, not one length
    assert all(3 <= t < 4096 for r in a for t in r.prompt_token_ids)


def test_fixed_and_shared_prefix() -> None:
    fixed = fixed_lengths(5, vocab_size=100, prompt_len=7, output_len=3)
    assert [(len(r.prompt_token_ids), r.output_len) for r in fixed] == [(7, 3)] * 5
    shared = shared_prefix(4, vocab_size=4096, system_len=32, user_len=8, output_len=5)
    assert len({tuple(r.prompt_token_ids[:32]) for r in shared}) == 1
    assert len({tuple(r.prompt_token_ids[32:]) for r in shared}) == 4
    own = shared_prefix(4, vocab_size=4096, system_len=32, user_len=8, output_len=5, shared=False)
    assert len({tuple(r.prompt_token_ids[:32]) for r in own}) == 4


def test_jsonl(tmp_path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        json.dumps({"prompt": "def add(a, b):", "output_len": 12}) + "\n\n"
        + json.dumps({"prompt_token_ids": [5, 6, 7]}) + "\n"
    )  # fmt: skip
    rows = from_jsonl(path, default_model(), default_output_len=9)
    assert len(rows) == 2 and rows[0].output_len == 12 and len(rows[0].prompt_token_ids) > 0
    assert rows[1].prompt_token_ids == [5, 6, 7] and rows[1].output_len == 9


def test_arrivals() -> None:
    assert arrival_times(3, None) == [0.0, 0.0, 0.0]
    times = arrival_times(2000, 10.0, seed=1)
    assert times == sorted(times) and times[0] == 0.0
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert abs(statistics.fmean(gaps) - 0.1) < 0.01  # exponential gaps of mean 1 / rate


def test_capacity_paged_beats_contiguous_reservation() -> None:
    trace = sharegpt_like(48, vocab_size=4096, max_model_len=256, prompt_median=32, output_median=24, seed=1)
    cap = capacity(trace, num_blocks=64, block_size=16, max_model_len=256)
    assert cap.contiguous_slots == 4
    assert cap.contiguous.peak_running == 4
    assert cap.paged.peak_running >= 3 * cap.contiguous.peak_running
    assert cap.paged.peak_blocks_used <= 64


def test_sharing_uses_fewer_blocks() -> None:
    rows = sharing(vocab_size=4096, block_size=16, num_blocks=1024, max_model_len=512, prompt_len=128,
                   output_len=32, system_len=128, num_users=4, user_len=16)  # fmt: skip
    fork, prefix = rows
    # without sharing: 4 sequences of 128 + 32 tokens, 10 blocks each
    assert fork.unshared_blocks == 4 * 10
    # with: the 8 prompt blocks once, then each sample's own 2 blocks of output (and at most a few in flight)
    assert 8 + 4 * 2 <= fork.shared_blocks < fork.unshared_blocks
    # 4 users of 128 + 16 + 32 tokens = 11 blocks each without sharing; with it, 8 system blocks once
    assert prefix.unshared_blocks == 4 * 11
    assert 8 + 4 * 3 <= prefix.shared_blocks < prefix.unshared_blocks
