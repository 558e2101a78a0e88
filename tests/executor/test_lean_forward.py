"""The lean forward (services/executor/lean_forward.py) gives the same logits, and writes the same
KV, bit for bit, as transformers' own forward through pagedserve's attention; with its linears on
packed weights (the default on CPU), the same to float32 rounding and the same greedy tokens."""

from __future__ import annotations

import pytest
import torch
from executor_harness import VOCAB, make_prompts

from pagedserve.executor import lean_forward
from pagedserve.executor.inputs import ScheduledSeq
from pagedserve.executor.kv_pool import KVPool
from pagedserve.executor.lean_forward import ENV_SWITCH, LeanForward, lean_forward_for
from pagedserve.executor.model_runner import ModelRunner
from pagedserve.kernels import cpu_native
from pagedserve.kernels.packed_gemm import PackedLinear

BLOCK = 8


def _steps(prompts: list[list[int]]) -> list[list[tuple[int, int, int, bool]]]:
    """(prompt index, start, num_tokens, sample) per sequence per step: whole prefills, a chunked
    one, then decodes mixed with the chunk's rest."""
    a, b, c = (len(p) for p in prompts)
    return [
        [(0, 0, a, True), (1, 0, b, True), (2, 0, c // 2, False)],
        [(0, a, 1, True), (2, c // 2, c - c // 2, True), (1, b, 1, True)],
        [(1, b + 1, 1, True), (0, a + 1, 1, True), (2, c, 1, True)],
    ]


def _run(runner: ModelRunner, prompts: list[list[int]]) -> tuple[list[torch.Tensor], KVPool]:
    pool = KVPool(runner.kv_cache_spec(BLOCK), 48, runner.device)
    tables = [list(range(16 * i, 16 * (i + 1))) for i in range(len(prompts))]
    tokens = [list(p) + [7, 8, 9] for p in prompts]  # the "sampled" tokens, fixed for both runs
    logits = []
    for step in _steps(prompts):
        seqs = [ScheduledSeq(tokens[i], tables[i], start, n, sample) for i, start, n, sample in step]
        logits.append(runner.execute(seqs, pool))
    return logits, pool


def _lean_against_transformers(runner: ModelRunner, lean: LeanForward | None, prompts: list[list[int]]):
    """(lean logits, lean pool), (transformers' logits, its pool) over the same steps."""
    kept = runner.lean
    try:
        runner.lean = lean
        lean_run = _run(runner, prompts)
        runner.lean = None  # transformers' forward, the same weights
        return lean_run, _run(runner, prompts)
    finally:
        runner.lean = kept


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_lean_forward_is_bit_identical(family, tiny_model_dir, make_engine, monkeypatch) -> None:
    # with the native rotary embedding (kernels/csrc/rotary_cpu.c) on every q and k
    taken = []

    def rotary(*args):
        taken.append(cpu_native.rotary_in_place(*args))
        return taken[-1]

    monkeypatch.setattr(lean_forward, "rotary_in_place", rotary)
    runner = make_engine(tiny_model_dir(family)).runner
    assert runner.lean is not None, f"{family} should take the lean forward"
    taken.clear()  # the engine's start-up self-check ran it too
    prompts = make_prompts((5, 17, 30), VOCAB, seed=3)
    (lean_logits, lean_pool), (hf_logits, hf_pool) = _lean_against_transformers(
        runner, LeanForward(runner.model, pack=False), prompts
    )
    for i, (got, want) in enumerate(zip(lean_logits, hf_logits, strict=True)):
        assert got.shape == want.shape and torch.equal(got, want), f"step {i}"
    for layer in range(runner.num_layers):
        assert torch.equal(lean_pool.k_caches[layer], hf_pool.k_caches[layer])
        assert torch.equal(lean_pool.v_caches[layer], hf_pool.v_caches[layer])
    # q and k of every layer of the three steps, each rotated natively
    assert taken == [True] * (2 * runner.num_layers * 3)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_packed_linears_match_transformers_to_rounding(family, tiny_model_dir, make_engine) -> None:
    runner = make_engine(tiny_model_dir(family)).runner
    lean = runner.lean
    assert lean is not None, "packed by default on CPU"
    layer = lean.layers[0]  # q, k, v in one packed weight, gate and up in another
    assert all(isinstance(f, PackedLinear) for f in (layer.qkv, layer.o, layer.gate_up, layer.down))
    assert layer.qkv.out_features == layer.q_width + 2 * layer.kv_width
    # the model's own q and gate weights are rows of the joined ones, not a second copy
    attn, mlp = runner.model.model.layers[0].self_attn, runner.model.model.layers[0].mlp
    assert attn.q_proj.weight.data_ptr() == layer.qkv.weight.data_ptr()
    assert mlp.gate_proj.weight.data_ptr() == layer.gate_up.weight.data_ptr()
    assert isinstance(lean.lm_head, PackedLinear)
    prompts = make_prompts((5, 17, 30), VOCAB, seed=3)
    (lean_logits, lean_pool), (hf_logits, hf_pool) = _lean_against_transformers(runner, lean, prompts)
    for i, (got, want) in enumerate(zip(lean_logits, hf_logits, strict=True)):
        assert got.shape == want.shape, f"step {i}"
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"step {i}")
        assert torch.equal(got.argmax(-1), want.argmax(-1)), f"step {i}: greedy tokens"
    for layer in range(runner.num_layers):
        torch.testing.assert_close(lean_pool.k_caches[layer], hf_pool.k_caches[layer], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(lean_pool.v_caches[layer], hf_pool.v_caches[layer], rtol=1e-4, atol=1e-5)


def test_other_architectures_and_the_switch_keep_transformers_forward(
    tiny_model_dir, make_engine, monkeypatch
) -> None:
    assert make_engine(tiny_model_dir("gpt2")).runner.lean is None  # not Llama-shaped
    model = make_engine(tiny_model_dir("llama")).runner.model
    assert lean_forward_for(model) is not None
    monkeypatch.setenv(ENV_SWITCH, "0")
    assert lean_forward_for(model) is None
    monkeypatch.delenv(ENV_SWITCH)
    handle = model.model.layers[0].mlp.register_forward_hook(lambda *args: None)
    try:
        assert lean_forward_for(model) is None, "a hook would be skipped by the lean forward"
    finally:
        handle.remove()
