"""The delta protocol beyond plain runs: prefix-cache hits, copy-on-write, recompute after
preemption, housekeeping steps, sampling with logprobs; and how an engine is built (pool sizing,
max_model_len, models that cannot work)."""

from __future__ import annotations

import logging

import pytest
import torch
from executor_harness import GREEDY, VOCAB, make_prompts, reference_greedy, save_tiny_model, tiny_config

from pagedserve.common.params import SamplingParams
from pagedserve.common.step import CachedRequestData, NewRequestData, StepInput
from pagedserve.executor.config import WARM_UP_TOKENS
from pagedserve.executor.engine import ExecutorEngine
from pagedserve.executor.kv_pool import KVCacheSpec, check_fits, num_blocks_from_memory
from pagedserve.executor.model_runner import ModelRunner, UnsupportedModel
from pagedserve.kernels.backends import get_attention_backend


def decode(engine: ExecutorEngine, request_id: str, steps: int, new_blocks: dict[int, int]) -> list[int]:
    """`steps` decode steps of one request; new_blocks maps a computed-token count to a block to append."""
    tokens = []
    for _ in range(steps):
        computed = engine.requests[request_id].num_computed_tokens
        blocks = [new_blocks[computed]] if computed in new_blocks else []
        step = StepInput(
            0, engine.epoch, cached_requests=[CachedRequestData(request_id, blocks, 1, computed)]
        )
        tokens.append(engine.execute_step(step).sampled[0].token_id)
    return tokens


def test_prefix_hit_and_copy_on_write(tiny_model_dir, make_engine) -> None:
    """'b' shares 'a''s two full blocks (a prefix-cache hit) and a copy of its partial third block,
    then diverges; both continue exactly as `generate` would."""
    path = tiny_model_dir("llama")
    (shared,) = make_prompts((20,), VOCAB, seed=5)
    prompt_a = shared
    prompt_b = shared + [11, 12, 13]
    expected_a, expected_b = reference_greedy(path, [prompt_a, prompt_b], 6)
    engine = make_engine(path, block_size=8, num_kv_blocks=32)

    step = StepInput(
        0, engine.epoch, new_requests=[NewRequestData("a", prompt_a, [], GREEDY, [3, 7, 1], 0, 20)]
    )
    got_a = [engine.execute_step(step).sampled[0].token_id]
    # 'a' now has 20 tokens of KV in blocks 3, 7 and 1 (4 of 8 slots used). 'b' reuses 3 and 7 as they
    # are, and block 1 through a copy into 12, because it will write past token 20 where 'a' writes too.
    step = StepInput(
        1,
        engine.epoch,
        new_requests=[NewRequestData("b", prompt_b, [], GREEDY, [3, 7, 12], 20, 3)],
        cached_requests=[CachedRequestData("a", [], 1, 20)],
        block_copies=[(1, 12)],
    )
    out = {s.request_id: s.token_id for s in engine.execute_step(step).sampled}
    got_a.append(out["a"])
    got_b = [out["b"]]
    got_a += decode(engine, "a", 4, {24: 10})
    got_b += decode(engine, "b", 5, {24: 9})
    assert got_a == expected_a
    assert got_b == expected_b


def test_recompute_after_preemption_continues_the_same(tiny_model_dir, make_engine) -> None:
    """A request dropped mid-generation and re-sent with its outputs (into other blocks) goes on
    with the same tokens; a finished id the executor never held is ignored."""
    path = tiny_model_dir("gpt2")
    (prompt,) = make_prompts((13,), VOCAB, seed=6)
    (expected,) = reference_greedy(path, [prompt], 10)
    engine = make_engine(path, block_size=8, num_kv_blocks=32)
    step = StepInput(0, engine.epoch, new_requests=[NewRequestData("r", prompt, [], GREEDY, [0, 1], 0, 13)])
    got = [engine.execute_step(step).sampled[0].token_id]
    got += decode(engine, "r", 4, {16: 2})
    # Preempted: dropped in a housekeeping step (no tokens scheduled), then recomputed elsewhere.
    out = engine.execute_step(StepInput(5, engine.epoch, forget_request_ids=["r", "never-seen"]))
    assert out.sampled == [] and not engine.requests
    known = prompt + got
    step = StepInput(
        6, engine.epoch, new_requests=[NewRequestData("r", prompt, got, GREEDY, [9, 8, 15], 0, len(known))]
    )
    got.append(engine.execute_step(step).sampled[0].token_id)
    assert engine.requests["r"].output_token_ids == got
    got += decode(engine, "r", 4, {})
    assert got == expected


def test_resend_in_the_same_step_as_its_finish(tiny_model_dir, make_engine) -> None:
    engine = make_engine(tiny_model_dir("llama"), block_size=8, num_kv_blocks=32)
    new = NewRequestData("r", [5, 6, 7], [], GREEDY, [4], 0, 3)
    first = engine.execute_step(StepInput(0, engine.epoch, new_requests=[new])).sampled[0].token_id
    again = engine.execute_step(StepInput(1, engine.epoch, new_requests=[new], forget_request_ids=["r"]))
    assert again.sampled[0].token_id == first
    assert engine.requests["r"].token_ids == [5, 6, 7, first]


def test_logprobs_and_seeded_sampling_go_through_the_sampler(tiny_model_dir, make_engine) -> None:
    engine = make_engine(tiny_model_dir("llama"), block_size=8, num_kv_blocks=32)
    seeded = SamplingParams(temperature=1.0, seed=42, logprobs=3)
    step = StepInput(
        0,
        engine.epoch,
        new_requests=[
            NewRequestData("g", [5, 6, 7], [], SamplingParams(temperature=0.0, logprobs=2), [0], 0, 3),
            NewRequestData("s", [5, 6, 7], [], seeded, [1], 0, 3),
            NewRequestData("t", [9, 9, 9, 9, 9], [], GREEDY, [2], 0, 2),  # mid-prompt chunk: no token
        ],
    )
    out = {s.request_id: s for s in engine.execute_step(step).sampled}
    assert sorted(out) == ["g", "s"]
    greedy = out["g"].logprobs
    assert greedy is not None and len(greedy.top) == 2 and greedy.top[0][0] == out["g"].token_id
    assert greedy.logprob == pytest.approx(greedy.top[0][1]) and greedy.logprob < 0
    assert out["s"].logprobs is not None and len(out["s"].logprobs.top) == 3
    # The same seed at the same output length picks the same token, whatever the batch.
    other = make_engine(tiny_model_dir("llama"), block_size=8, num_kv_blocks=32)
    alone = StepInput(0, other.epoch, new_requests=[NewRequestData("s", [5, 6, 7], [], seeded, [7], 0, 3)])
    assert other.execute_step(alone).sampled[0].token_id == out["s"].token_id


def test_info_describes_model_and_pool(tiny_model_dir, make_engine) -> None:
    path = tiny_model_dir("mistral")
    engine = make_engine(path, block_size=8, num_kv_blocks=40)
    info = engine.info()
    assert info.model == str(path)
    assert (info.architecture, info.dtype, info.vocab_size) == ("MistralForCausalLM", "float32", VOCAB)
    assert (info.num_blocks, info.block_size, info.eos_token_ids) == (40, 8, (2,))
    assert (info.attention_backend, info.device) == ("torch", "cpu")
    assert info.max_model_len == 128, "capped at the sliding window, which the kernels do not implement"
    assert len(info.epoch) == 32 and make_engine(path).info().epoch != info.epoch
    k = engine.pool.k_caches
    assert len(k) == 2 and k[0].shape == (40, 8, 2, 16) and k[0].dtype == torch.float32


def test_max_model_len_limits(tiny_model_dir, make_engine) -> None:
    assert make_engine(tiny_model_dir("llama")).info().max_model_len == 256  # max_position_embeddings
    assert make_engine(tiny_model_dir("llama"), max_model_len=100).info().max_model_len == 100
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings=256"):
        make_engine(tiny_model_dir("llama"), max_model_len=300)
    with pytest.raises(ValueError, match="exceeds the model's sliding window of 128 tokens"):
        make_engine(tiny_model_dir("mistral"), max_model_len=200)


def test_pool_sizing_and_startup_log(tiny_model_dir, make_engine, caplog) -> None:
    path = tiny_model_dir("llama")
    # 2 layers x K,V x 16 tokens x 2 KV heads x 16 dims x 4 bytes = 8 KiB per block.
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float32, block_size=16)
    assert spec.bytes_per_block == 8192
    assert num_blocks_from_memory(spec, 100_000) == 12
    with caplog.at_level(logging.INFO, logger="pagedserve.executor.engine"):
        engine = make_engine(
            path, block_size=16, num_kv_blocks=None, kv_cache_memory=100_000, max_model_len=96
        )
    assert engine.pool.num_blocks == 12
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("KV pool:"))
    assert "12 blocks x 16 tokens = 192 tokens, 96.0 KiB" in line
    assert "max concurrency at max_model_len=96: 2.00x" in line
    # Too small for one sequence of max_model_len: the message says what would fit.
    with pytest.raises(ValueError) as err:
        make_engine(path, block_size=16, num_kv_blocks=None, kv_cache_memory=40_000, max_model_len=96)
    message = str(err.value)
    assert "4 blocks (64 tokens" in message and "needs 6 blocks" in message
    assert "--num-kv-blocks >= 6" in message and "--kv-cache-memory >= 49152" in message
    assert "--max-model-len to at most 64" in message
    check_fits(spec, 6, 96)


@pytest.mark.parametrize(
    ("config_name", "kwargs"),
    [
        ("OpenAIGPTConfig", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB)),
        ("BloomConfig", dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=VOCAB)),
    ],
)
def test_architectures_without_the_attention_interface_fail_fast(config_name, kwargs) -> None:
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_name)(**kwargs))
    with pytest.raises(UnsupportedModel, match="does not route attention through AttentionInterface"):
        ModelRunner.from_model(model, get_attention_backend("torch", "cpu"))


def test_the_probe_maps_layers_and_layout(tmp_path) -> None:
    path = save_tiny_model("qwen2", tmp_path / "qwen2")
    runner = ModelRunner.load(str(path), device="cpu", attention_backend="torch")
    config = tiny_config("qwen2")
    assert (runner.num_layers, runner.num_heads, runner.num_kv_heads, runner.head_dim) == (2, 4, 1, 16)
    assert runner.sliding_window is None and not config.use_sliding_window
    runner.self_check(block_size=4)


def test_a_step_where_nothing_samples(tiny_model_dir, make_engine) -> None:
    """Only mid-prompt chunks: the forward runs, no logits are kept, no token comes back."""
    engine = make_engine(tiny_model_dir("llama"), block_size=8, num_kv_blocks=32)
    prompt = list(range(3, 23))
    new = [
        NewRequestData("p", prompt, [], GREEDY, [6, 2, 5], 0, 9),
        NewRequestData("q", prompt, [], GREEDY, [1], 0, 4),
    ]
    assert engine.execute_step(StepInput(0, engine.epoch, new_requests=new)).sampled == []
    assert (engine.requests["p"].num_computed_tokens, engine.requests["q"].num_computed_tokens) == (9, 4)
    rest = StepInput(1, engine.epoch, cached_requests=[CachedRequestData("p", [], 11, 9)])
    (token,) = engine.execute_step(rest).sampled
    (expected,) = reference_greedy(tiny_model_dir("llama"), [prompt], 1)
    assert [token.token_id] == expected


def test_architectures_that_need_more_than_the_kernels_do_fail_fast() -> None:
    import transformers

    def runner_for(config) -> ModelRunner:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
        return ModelRunner.from_model(model, get_attention_backend("torch", "cpu"))

    dims = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB
    )
    with pytest.raises(
        UnsupportedModel, match="needs \\['softcap'\\], which pagedserve's kernels do not implement"
    ):
        runner_for(transformers.Gemma2Config(**dims, num_key_value_heads=1, head_dim=16))
    with pytest.raises(UnsupportedModel, match="do not pass the forward's keyword arguments"):
        runner_for(transformers.StableLmConfig(**dims, num_key_value_heads=2))


def test_a_step_with_an_older_fencing_token_is_refused(tiny_model_dir, make_engine) -> None:
    """Once a scheduler with fencing token 5 drove the executor, one holding token 3 (it lost
    the pool's lease) is refused, and its step changes nothing; unfenced steps (0) still run."""
    from pagedserve.common.errors import FailedPrecondition

    engine = make_engine(tiny_model_dir("llama"), block_size=8, num_kv_blocks=32)
    new = NewRequestData("r", [5, 6, 7], [], GREEDY, [4], 0, 3)
    engine.execute_step(StepInput(0, engine.epoch, new_requests=[new], fence=5))
    stale = NewRequestData("s", [8, 9], [], GREEDY, [5], 0, 2)
    with pytest.raises(FailedPrecondition, match="fenced: step 1 carries fencing token 3"):
        engine.execute_step(StepInput(1, engine.epoch, new_requests=[stale], fence=3))
    assert set(engine.requests) == {"r"}
    assert engine.execute_step(StepInput(2, engine.epoch, forget_request_ids=["r"], fence=5)).sampled == []
    assert engine.execute_step(StepInput(3, engine.epoch, new_requests=[stale])).sampled


def test_beam_candidates_are_the_models_top_log_probabilities(tiny_model_dir, make_engine) -> None:
    """A beam-search sequence's step returns its best `num_beam_candidates` next tokens by
    log_softmax of the raw logits, best first, as transformers' beam search scores them; a
    request without the field gets none."""
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir("llama")
    prompt, other = make_prompts((13, 6), VOCAB, seed=8)
    beam = SamplingParams(max_tokens=4, temperature=0.0, n=3, use_beam_search=True)
    engine = make_engine(path, block_size=8, num_kv_blocks=32)
    step = StepInput(
        0,
        engine.epoch,
        new_requests=[
            NewRequestData("beam", prompt, [], beam, [0, 1], 0, 13, num_beam_candidates=6),
            NewRequestData("plain", other, [], GREEDY, [2], 0, 6),
        ],
    )
    out = {s.request_id: s for s in engine.execute_step(step).sampled}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].float()  # [V]
    values, ids = logits.log_softmax(dim=-1).topk(6)
    candidates = out["beam"].beam_candidates
    assert [t for t, _ in candidates] == ids.tolist()
    assert [lp for _, lp in candidates] == pytest.approx(values.tolist(), abs=1e-5)
    assert out["beam"].token_id == candidates[0][0]  # the sampled token is the argmax
    assert out["plain"].beam_candidates == []


def test_a_beam_forks_a_held_request_without_its_prompt(tiny_model_dir, make_engine) -> None:
    """`fork_of`: the child takes the parent's prompt and first num_computed_tokens tokens (the
    parent's forget in the same step applies after) and continues with its own token, exactly
    as if it had been sent whole; an unknown parent is refused, naming the field."""
    from pagedserve.common.errors import InvalidArgument

    path = tiny_model_dir("llama")
    (prompt,) = make_prompts((11,), VOCAB, seed=9)
    beam = SamplingParams(max_tokens=8, temperature=0.0, n=2, use_beam_search=True)
    engine = make_engine(path, block_size=8, num_kv_blocks=32)
    first = StepInput(0, engine.epoch, new_requests=[NewRequestData("p", prompt, [], beam, [0, 1], 0, 11, 4)])
    candidates = engine.execute_step(first).sampled[0].beam_candidates
    second_best = candidates[1][0]  # not the token the executor appended to "p" itself
    # Block 1 holds tokens 8..10 of "p"; the child writes token 11 there after a copy into 2.
    fork = NewRequestData("c", [], [second_best], beam, [0, 2], 11, 1, 4, fork_of="p")
    step = StepInput(1, engine.epoch, new_requests=[fork], forget_request_ids=["p"], block_copies=[(1, 2)])
    got = engine.execute_step(step).sampled[0]
    assert "p" not in engine.requests and engine.requests["c"].token_ids == [
        *prompt,
        second_best,
        got.token_id,
    ]

    whole = make_engine(path, block_size=8, num_kv_blocks=32)
    again = StepInput(
        0, whole.epoch, new_requests=[NewRequestData("c", prompt, [second_best], beam, [0, 1], 0, 12, 4)]
    )
    want = whole.execute_step(again).sampled[0]
    assert got.token_id == want.token_id
    assert [t for t, _ in got.beam_candidates] == [t for t, _ in want.beam_candidates]
    assert [lp for _, lp in got.beam_candidates] == pytest.approx(
        [lp for _, lp in want.beam_candidates], abs=1e-5
    )

    orphan = NewRequestData("d", [], [5], beam, [3], 4, 1, 4, fork_of="gone")
    with pytest.raises(InvalidArgument) as err:
        engine.execute_step(StepInput(2, engine.epoch, new_requests=[orphan]))
    assert err.value.field == "fork_of" and "c" in engine.requests  # the refused step changed nothing


def test_warm_up_step_leaves_the_pool_and_the_requests_alone(tiny_model_dir, make_engine) -> None:
    path = tiny_model_dir("llama")
    engine = make_engine(path)  # executor default: 8,192 tokens per step, max_model_len 256 here
    assert engine.warm_up_tokens == WARM_UP_TOKENS, "the scheduler's default budget, not the executor's limit"
    assert make_engine(path, max_num_batched_tokens=300).warm_up_tokens == 300
    assert make_engine(path, max_num_batched_tokens=5000).warm_up_tokens == 5000, "asked for: warmed as asked"
    pool_before = engine.pool.kv.clone()
    pool, seqs = engine.runner.largest_step(600, 256, engine.pool.block_size)
    assert [s.num_tokens for s in seqs] == [256, 256, 88] and pool is not engine.pool
    assert engine.warm_up(600) > 0
    assert not engine.requests and torch.equal(engine.pool.kv, pool_before), "a throw-away pool, nothing held"
    assert torch.get_num_threads() == engine.step_threads
    # The first real step after it is a normal one.
    new = [NewRequestData("r0", list(range(3, 40)), [], GREEDY, [0, 1, 2, 3, 4], 0, 37)]
    out = engine.execute_step(StepInput(0, engine.epoch, new_requests=new))
    assert [s.request_id for s in out.sampled] == ["r0"]
    engine.execute_step(StepInput(1, engine.epoch, forget_request_ids=["r0"]))
