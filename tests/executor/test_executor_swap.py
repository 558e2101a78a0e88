"""Swap preemption in the executor: a sequence's KV goes to CPU blocks and comes back exactly,
in every layer, and decoding then goes on as `generate` would; malformed swap mappings are
refused whole."""

from __future__ import annotations

import pytest
import torch
from executor_harness import GREEDY, VOCAB, make_prompts, reference_greedy

from pagedserve.common.errors import InvalidArgument
from pagedserve.common.step import CachedRequestData, NewRequestData, StepInput
from pagedserve.kernels.swap_blocks import swap_blocks, swap_blocks_ref

SWAP_GIB = 64 * 1024 / 1024**3  # 64 KiB: a few dozen blocks of the tiny model


def test_swap_blocks_matches_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    src = torch.randn(2, 3, 10, 4, 2, 8, generator=gen)
    got = torch.randn(2, 3, 6, 4, 2, 8, generator=gen)
    want = got.clone()
    mapping = torch.tensor([[7, 0], [2, 5], [9, 3]])
    swap_blocks(src, got, mapping)
    swap_blocks_ref(src, want, mapping)
    assert torch.equal(got, want)
    assert torch.equal(got[:, :, 5], src[:, :, 2])


def test_swap_out_and_in_round_trips_kv_exactly_and_decoding_goes_on(tiny_model_dir, make_engine) -> None:
    path = tiny_model_dir("llama")
    (prompt,) = make_prompts((20,), VOCAB, seed=7)
    (expected,) = reference_greedy(path, [prompt], 8)
    engine = make_engine(path, block_size=8, num_kv_blocks=32, swap_space=SWAP_GIB)
    assert engine.info().num_cpu_blocks == engine.swap.num_blocks == 16
    layers = engine.pool.kv.size(1)
    assert layers == 2

    step = StepInput(
        0, engine.epoch, new_requests=[NewRequestData("a", prompt, [], GREEDY, [3, 7, 1], 0, 20)]
    )
    tokens = [engine.execute_step(step).sampled[0].token_id]
    kv_before = engine.pool.kv[:, :, [3, 7, 1]].clone()  # [2, L, 3, bs, Hkv, D]: K and V of every layer

    # Swap out (and forget): the device blocks are then taken by someone else and overwritten.
    step = StepInput(1, engine.epoch, forget_request_ids=["a"], swap_out=[(3, 4), (7, 0), (1, 6)])
    assert engine.execute_step(step).sampled == []
    assert torch.equal(engine.swap.kv[:, :, [4, 0, 6]], kv_before)
    engine.pool.kv[:, :, [3, 7, 1]] = torch.randn_like(kv_before)

    # Swap in to other device blocks and resume with the computed tokens as they were.
    step = StepInput(
        2,
        engine.epoch,
        new_requests=[NewRequestData("a", prompt, tokens, GREEDY, [9, 2, 12], 20, 1)],
        swap_in=[(4, 9), (0, 2), (6, 12)],
    )
    tokens.append(engine.execute_step(step).sampled[0].token_id)
    # The swapped-in blocks hold the same KV in every layer (the step then wrote slot 20 of block 12).
    after = engine.pool.kv[:, :, [9, 2, 12]]
    assert torch.equal(after[:, :, :2], kv_before[:, :, :2])
    assert torch.equal(after[:, :, 2, :4], kv_before[:, :, 2, :4])
    for computed in range(21, 27):
        blocks = [5] if computed == 24 else []
        step = StepInput(3, engine.epoch, cached_requests=[CachedRequestData("a", blocks, 1, computed)])
        tokens.append(engine.execute_step(step).sampled[0].token_id)
    assert tokens == expected


@pytest.mark.parametrize(
    ("swap_out", "swap_in", "message"),
    [
        ([(3, 99)], [], r"swap_out \(3 -> 99\) is outside the pools"),
        ([(99, 0)], [], r"swap_out \(99 -> 0\) is outside the pools"),
        ([], [(0, 99)], r"swap_in \(0 -> 99\) is outside the pools"),
        ([(1, 0), (2, 0)], [], "swap_out: block 0 is the destination of more than one swap"),
        ([(1, 0)], [(0, 5)], "a CPU block is both swapped out to and swapped in from in one step"),
    ],
)
def test_malformed_swaps_are_refused(tiny_model_dir, make_engine, swap_out, swap_in, message) -> None:
    engine = make_engine(tiny_model_dir("llama"), num_kv_blocks=32, swap_space=SWAP_GIB)
    before = engine.pool.kv.clone(), engine.swap.kv.clone()
    with pytest.raises(InvalidArgument, match=message):
        engine.execute_step(StepInput(0, engine.epoch, swap_out=swap_out, swap_in=swap_in))
    assert torch.equal(engine.pool.kv, before[0]) and torch.equal(engine.swap.kv, before[1])


def test_no_swap_space_refuses_swaps(tiny_model_dir, make_engine) -> None:
    engine = make_engine(tiny_model_dir("llama"), num_kv_blocks=32)
    assert engine.info().num_cpu_blocks == 0  # on CPU the default is no swap space
    with pytest.raises(
        InvalidArgument, match=r"swap_out: this executor has no swap space \(--swap-space 0\)"
    ) as e:
        engine.execute_step(StepInput(0, engine.epoch, swap_out=[(1, 0)]))
    assert e.value.field == "swap_out"


def test_swap_space_sizing(monkeypatch) -> None:
    from pagedserve.executor import swap_space
    from pagedserve.executor.config import ExecutorConfig
    from pagedserve.executor.kv_pool import KVCacheSpec

    spec = KVCacheSpec(num_layers=4, num_kv_heads=4, head_dim=32, dtype=torch.float32, block_size=16)
    assert spec.bytes_per_block == 64 * 1024
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert swap_space.num_cpu_blocks(spec, None, cpu) == 0  # CPU: off unless asked for
    assert swap_space.num_cpu_blocks(spec, 0.5, cpu) == 8192
    monkeypatch.setattr(swap_space, "host_memory_bytes", lambda: 64 << 30)
    assert swap_space.num_cpu_blocks(spec, None, cuda) == 4 * 16384  # 4 GiB on CUDA ...
    monkeypatch.setattr(swap_space, "host_memory_bytes", lambda: 8 << 30)
    assert swap_space.num_cpu_blocks(spec, None, cuda) == 2 * 16384  # ... at most a quarter of the host's
    with pytest.raises(ValueError, match="--swap-space must be >= 0 GiB, got -1"):
        ExecutorConfig(swap_space=-1).validate()
