"""Beam search in the engine against transformers' `generate(num_beams=n)`, on a real executor.

The scheduler drives an in-process `ExecutorEngine` over a real Redis. For random Llama and
Qwen2 models (float32) and the bundled model, prompts of several lengths, early_stopping
True/False/"never", length penalties other than 1, with EOS reached and without: the returned
beams, their order and token ids equal transformers'; their scores agree to 1e-4. Beams share
blocks while they run (fewer used than unshared copies would need) and fsck is clean after.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from hf_reference import reference_beams, reference_greedy
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from pagedserve.common.outputs import FinishReason
from pagedserve.common.params import SamplingParams
from pagedserve.common.sizes import cdiv
from pagedserve.common.step import StepInput, StepOutput
from pagedserve.executor.client import InProcessExecutorClient
from pagedserve.executor.config import ExecutorConfig
from pagedserve.executor.engine import ExecutorEngine
from pagedserve.scheduler.engine import SchedulerEngine
from pagedserve.scheduler.redis_pool import RedisBlockPool

from .helpers import Collected, assert_pool_clean, drain, run_all, settle
from .test_with_executor import make_prompts

VOCAB = 384
SCORE_TOLERANCE = 1e-4  # absolute; relative 1e-5 where larger
PROBE = [11, 12, 13, 14, 15]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def save_with_likely_eos(model, path: Path) -> int:
    """Make the 3rd token of PROBE's greedy continuation the model's EOS, so that beams reach it."""
    model.save_pretrained(path)
    eos = reference_greedy(path, [PROBE], 3)[0][2]
    model.config.eos_token_id = eos
    model.generation_config.eos_token_id = eos
    model.save_pretrained(path)
    return eos


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def random_model(request, tmp_path_factory) -> tuple[Path, int]:
    torch.manual_seed(7)
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, pad_token_id=0, initializer_range=0.2,
    )  # fmt: skip
    config = LlamaConfig(**common) if request.param == "llama" else Qwen2Config(**common)
    path = tmp_path_factory.mktemp(f"beam-{request.param}")
    eos = save_with_likely_eos(AutoModelForCausalLM.from_config(config), path)
    return path, eos


def make_engine(model: str | Path, redis_client, name: str, num_blocks: int, block_size: int = 4, **limits):
    executor = ExecutorEngine.from_config(
        ExecutorConfig(
            model=str(model), device="cpu", attention_backend="torch", block_size=block_size,
            num_kv_blocks=num_blocks, max_num_batched_tokens=1024,
            max_model_len=min(128, num_blocks * block_size),
        )
    )  # fmt: skip
    client = WatchingClient(executor)
    engine = asyncio.run(SchedulerEngine.connect(client, RedisBlockPool(redis_client, name), **limits))
    client.engine_ref = engine
    return engine, executor, client


class WatchingClient(InProcessExecutorClient):
    """Records, before each step, the blocks in use against what unshared beams would hold."""

    def __init__(self, engine: ExecutorEngine) -> None:
        super().__init__(engine)
        self.engine_ref: SchedulerEngine | None = None
        self.samples: list[tuple[int, int]] = []  # (blocks used, blocks n unshared copies need)

    async def execute_step(self, step: StepInput) -> StepOutput:
        sched = self.engine_ref.scheduler
        beams = [s for r in sched.requests.values() if r.beam is not None for s in r.seqs if s.block_table]
        if len(beams) > 1:
            unshared = sum(cdiv(s.num_tokens, sched.block_size) for s in beams)
            self.samples.append((sched.blocks.counts().num_used, unshared))
        return await super().execute_step(step)


def beam_params(n: int, max_tokens: int, *, eos: bool, **kw) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens, temperature=0.0, n=n, use_beam_search=True, ignore_eos=not eos, **kw
    )


def assert_same_beams(out: Collected, want: list[tuple[list[int], float]], params: SamplingParams, what: str):
    got = [out.tokens[i] for i in range(len(want))]
    assert got == [tokens for tokens, _ in want], what
    for i, (tokens, score) in enumerate(want):
        cumulative, beam_score = out.scores[i]
        assert beam_score == pytest.approx(cumulative / len(tokens) ** params.length_penalty)
        if score is not None:  # (one beam: greedy, transformers gives no score)
            assert beam_score == pytest.approx(score, rel=1e-5, abs=SCORE_TOLERANCE), f"{what}: beam {i}"
        ended_by_eos = out.stop_token[i] != -1
        assert out.finish[i] == (FinishReason.STOP if ended_by_eos else FinishReason.LENGTH)
    assert out.usage.completion_tokens == sum(len(t) for t in got)


CASES = [  # (prompt length, n, max_tokens, eos, early_stopping, length_penalty)
    (5, 3, 8, True, False, 1.0),
    (1, 2, 6, True, True, 1.0),
    (13, 4, 7, True, "never", 2.0),
    (9, 3, 9, True, False, -0.5),
    (5, 2, 7, True, "never", 0.0),
    (22, 3, 6, False, False, 1.0),
    (6, 4, 5, False, True, 0.7),
    (5, 1, 6, True, False, 1.0),
]


def test_beams_equal_transformers_on_random_models(random_model, redis_client):
    path, eos = random_model
    engine, executor, client = make_engine(path, redis_client, f"beam-{path.name}", num_blocks=256)
    prompts = [PROBE if length == 5 else p for length, p in zip(
        [c[0] for c in CASES], make_prompts([c[0] for c in CASES], VOCAB, seed=3), strict=True
    )]  # fmt: skip
    params = [
        beam_params(n, mt, eos=e, early_stopping=es, length_penalty=lp) for _, n, mt, e, es, lp in CASES
    ]

    async def go():
        streams = [
            engine.submit(f"b{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
        ]
        outs = await run_all(engine, streams, timeout=120)
        await settle(engine)
        return outs

    outs = asyncio.run(go())
    reached_eos = 0
    for i, (out, case) in enumerate(zip(outs, CASES, strict=True)):
        _, n, max_tokens, has_eos, es, lp = case
        want = reference_beams(
            path, prompts[i], n, max_tokens, length_penalty=lp, early_stopping=es,
            eos_token_id=eos if has_eos else None,
        )  # fmt: skip
        assert_same_beams(out, want, params[i], f"case {case}")
        reached_eos += sum(tokens[-1] == eos for tokens, _ in want if has_eos)
    assert reached_eos > 0  # some hypotheses ended with EOS
    assert client.samples and all(used <= unshared for used, unshared in client.samples)
    assert any(used < unshared for used, unshared in client.samples)  # blocks were shared
    assert_pool_clean(engine)
    assert executor.requests == {}


@pytest.fixture(scope="module")
def bundled_with_likely_eos(bundled_model_path, tmp_path_factory) -> Path:
    """The bundled weights with an EOS it emits (its own EOS ids never come in a few tokens):
    the 3rd token of a prompt's greedy continuation, beside its second EOS id."""
    import json
    import shutil

    path = tmp_path_factory.mktemp("bundled-eos") / "tiny-py"
    shutil.copytree(bundled_model_path, path)
    prompt = make_prompts([6], VOCAB, seed=21)[0]
    likely = reference_greedy(path, [prompt], 3)[0][2]
    config = json.loads((path / "generation_config.json").read_text())
    config["eos_token_id"] = [likely, config["eos_token_id"][-1]]
    (path / "generation_config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("eos_reached", [False, True])
def test_beams_on_the_bundled_model_share_blocks(
    bundled_model_path, bundled_with_likely_eos, redis_client, eos_reached
):
    """The bundled weights (two EOS ids: each beam offers 3 x n candidates), prompts of 3, 6,
    10 and 25 tokens beside a plain request; with its own EOS ids (never reached in 12
    tokens), and with a likely one (hypotheses end with it)."""
    path = bundled_with_likely_eos if eos_reached else Path(bundled_model_path)
    engine, executor, client = make_engine(path, redis_client, f"beam-bundled-{eos_reached}", num_blocks=160)
    eos = list(executor.info().eos_token_ids)
    assert len(eos) == 2
    prompts = make_prompts([3, 10, 25], VOCAB, seed=5) + [make_prompts([6], VOCAB, seed=21)[0]]
    settings = [(4, 12, 1.5, "never"), (3, 10, 1.0, False), (2, 12, 0.8, True), (3, 11, 1.0, False)]
    params = [
        beam_params(n, mt, eos=True, length_penalty=lp, early_stopping=es) for n, mt, lp, es in settings
    ]
    plain = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)

    async def go():
        streams = [
            engine.submit(f"beam{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
        ]
        streams.append(engine.submit("plain", prompts[1][:7], plain))
        outs = await run_all(engine, streams, timeout=120)
        await settle(engine)
        return outs

    *outs, out_plain = asyncio.run(go())
    ended_by_eos = 0
    for i, (out, (n, mt, lp, es)) in enumerate(zip(outs, settings, strict=True)):
        want = reference_beams(
            path, prompts[i], n, mt, length_penalty=lp, early_stopping=es, eos_token_id=eos
        )
        assert_same_beams(out, want, params[i], f"bundled prompt {i}")
        ended_by_eos += sum(tokens[-1] in eos for tokens, _ in want)
    assert (ended_by_eos > 0) == eos_reached
    assert out_plain.tokens[0] == reference_greedy(path, [prompts[1][:7]], 6)[0]
    assert any(used < unshared for used, unshared in client.samples)
    assert_pool_clean(engine)


def test_a_preempted_beam_request_starts_over_and_gives_the_same_beams(random_model, redis_client):
    path, eos = random_model
    # 3 beams of up to 24 + 12 tokens: 9 blocks each unshared; 20 blocks in all, with a plain
    # request competing for them, so that the newest (the beams) gets preempted.
    engine, executor, _ = make_engine(
        path, redis_client, f"beam-preempt-{path.name}", num_blocks=20, max_num_batched_tokens=64
    )
    prompt, other = make_prompts([24, 30], VOCAB, seed=9)
    params = beam_params(3, 12, eos=False, length_penalty=1.0)
    plain = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)

    async def go():
        streams = [engine.submit("plain", other, plain), engine.submit("beam", prompt, params)]
        outs = await run_all(engine, streams, timeout=120)
        await settle(engine)
        return outs

    out_plain, out = asyncio.run(go())
    assert engine.scheduler.stats.num_preemptions > 0
    assert_same_beams(out, reference_beams(path, prompt, 3, 12), params, "preempted")
    assert out_plain.tokens[0] == reference_greedy(path, [other], 40)[0]
    assert_pool_clean(engine)


def test_beams_taken_over_by_another_scheduler_start_over(random_model, redis_client):
    """A scheduler dies with beams in flight (their blocks and state in Redis): the next one
    drops them, restarts the search from the prompt when the client re-attaches, and gets
    transformers' beams; nothing leaks."""
    from pagedserve.scheduler.lease import Lease
    from pagedserve.scheduler.recovery import ChoiceProgress

    path, eos = random_model
    pool_id = f"beam-takeover-{path.name}"
    executor = ExecutorEngine.from_config(
        ExecutorConfig(
            model=str(path), device="cpu", attention_backend="torch", block_size=4,
            num_kv_blocks=128, max_num_batched_tokens=1024, max_model_len=128,
        )
    )  # fmt: skip
    prompt = make_prompts([14], VOCAB, seed=11)[0]
    params = beam_params(3, 10, eos=True, early_stopping="never", length_penalty=1.3)

    async def connect(ttl: float) -> SchedulerEngine:
        lease = Lease(redis_client, pool_id, ttl=ttl)
        assert lease.acquire() == 0.0
        client = InProcessExecutorClient(executor)
        return await SchedulerEngine.connect(client, RedisBlockPool(redis_client, pool_id), lease=lease)

    async def go():
        first = await connect(0.3)
        first.submit("beam", prompt, params)
        request = first.scheduler.requests["beam"]
        while not (len(request.seqs) == 3 and len(request.seqs[0].output_token_ids) >= 3):
            await first.step()
        await first.step()
        await first.replicator.flush()
        assert first.pool.counts().num_used > 0  # beams hold blocks in Redis
        await asyncio.sleep(0.35)  # kill -9: the first never writes again; its lease lapses
        second = await connect(5.0)
        assert list(second.scheduler.detached) == ["beam"]
        stream = second.attach("beam", prompt, params, 0, [ChoiceProgress(i, []) for i in range(3)])
        second.start()
        out = await asyncio.wait_for(drain(stream), 60)
        await settle(second)
        return out, second

    out, second = asyncio.run(go())
    want = reference_beams(path, prompt, 3, 10, length_penalty=1.3, early_stopping="never", eos_token_id=eos)
    assert_same_beams(out, want, params, "taken over")
    assert_pool_clean(second)
    assert executor.requests == {}


def test_beams_recomputed_after_the_executor_restarts(random_model, redis_client):
    from .test_with_executor import RestartingClient

    path, eos = random_model

    def executor() -> ExecutorEngine:
        return ExecutorEngine.from_config(
            ExecutorConfig(
                model=str(path), device="cpu", attention_backend="torch", block_size=4,
                num_kv_blocks=96, max_num_batched_tokens=1024, max_model_len=128,
            )
        )  # fmt: skip

    first, second = executor(), executor()
    client = RestartingClient(first, second, at=6)
    pool = RedisBlockPool(redis_client, f"beam-restart-{path.name}")
    engine = asyncio.run(SchedulerEngine.connect(client, pool))
    prompt = make_prompts([9], VOCAB, seed=12)[0]
    params = beam_params(3, 10, eos=True)

    async def go():
        outs = await run_all(engine, [engine.submit("beam", prompt, params)], timeout=60)
        await settle(engine)
        return outs[0]

    out = asyncio.run(go())
    assert engine.scheduler.stats.executor_restarts == 1
    assert_same_beams(out, reference_beams(path, prompt, 3, 10, eos_token_id=eos), params, "restarted")
    assert_pool_clean(engine)
    assert second.requests == {}


@pytest.mark.parametrize(
    ("limits", "n", "max_tokens", "words"),
    [
        ({"num_blocks": 30}, 4, 30, "needs 38 KV blocks"),  # 2 shared + 4 beams x (11 - 2) blocks of 4
        ({"max_num_seqs": 3}, 4, 4, "do not fit one step"),
        ({"max_num_batched_tokens": 2}, 3, 4, "do not fit one step"),
        ({"vocab_size": 9}, 5, 4, "candidate tokens"),  # 2 x 5 candidates
    ],
)
def test_beam_requests_that_can_never_run_are_refused_naming_n(limits, n, max_tokens, words) -> None:
    from pagedserve.common.errors import InvalidArgument
    from pagedserve.scheduler.admission import check_admissible
    from pagedserve.scheduler.config import SchedulerLimits

    base = dict(
        max_num_seqs=64, max_num_batched_tokens=256, max_queued_requests=8, max_model_len=128,
        num_blocks=1000, block_size=4, eos_token_ids=frozenset({2}), vocab_size=VOCAB,
    )  # fmt: skip
    params = beam_params(n, max_tokens, eos=True)
    with pytest.raises(InvalidArgument) as err:
        check_admissible(SchedulerLimits(**{**base, **limits}), "r", [5] * 11, params)
    assert err.value.field == "n" and words in err.value.message
    check_admissible(SchedulerLimits(**base), "r", [5] * 11, params)  # fits the default limits


def test_abort_mid_search_ends_every_beam_and_frees_the_blocks(random_model, redis_client):
    path, _ = random_model
    engine, executor, _ = make_engine(path, redis_client, f"beam-abort-{path.name}", num_blocks=128)
    prompt = make_prompts([10], VOCAB, seed=13)[0]

    async def go():
        stream = engine.submit("beam", prompt, beam_params(4, 60, eos=False))
        request = engine.scheduler.requests["beam"]
        engine.start()
        while not (len(request.seqs) == 4 and len(request.seqs[0].output_token_ids) >= 4):
            await asyncio.sleep(0.002)
        assert engine.scheduler.blocks.counts().num_used > 0
        assert engine.abort("beam")
        out = await asyncio.wait_for(drain(stream), 30)
        await settle(engine)
        return out

    out = asyncio.run(go())
    assert out.finish == {i: FinishReason.ABORT for i in range(4)}
    assert all(tokens == [] for tokens in out.tokens.values())
    assert_pool_clean(engine)
    assert executor.requests == {}


def test_beam_groups_that_do_not_fit_one_step_take_turns(random_model, redis_client):
    """With room for 4 sequences per step, two searches of 3 beams alternate (a group runs
    whole or not at all); a beam not run right after its parent is sent whole, not forked."""
    path, eos = random_model
    engine, executor, _ = make_engine(
        path, redis_client, f"beam-turns-{path.name}", num_blocks=128, max_num_seqs=4
    )
    prompts = make_prompts([7, 12], VOCAB, seed=14)
    params = beam_params(3, 8, eos=True, early_stopping=True)
    sent_whole = []
    build = engine.scheduler._build_step

    def spy(planned, copies):
        step = build(planned, copies)
        if step.step_input is not None:
            assert len(step.seqs) <= 4
            sent_whole.extend(
                r.request_id
                for r in step.step_input.new_requests
                if not r.fork_of and "#b0" not in r.request_id
            )
        return step

    engine.scheduler._build_step = spy

    async def go():
        streams = [engine.submit(f"t{i}", p, params) for i, p in enumerate(prompts)]
        outs = await run_all(engine, streams, timeout=60)
        await settle(engine)
        return outs

    outs = asyncio.run(go())
    for i, out in enumerate(outs):
        want = reference_beams(path, prompts[i], 3, 8, early_stopping=True, eos_token_id=eos)
        assert_same_beams(out, want, params, f"t{i}")
    assert sent_whole  # some beams waited a step and were sent whole
    assert_pool_clean(engine)
    assert executor.requests == {}
