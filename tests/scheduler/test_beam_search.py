"""Beam search in the engine against transformers' `generate(num_beams=n)`, on a real executor.

The scheduler drives an in-process `ExecutorEngine` over a real Redis. For random Llama and
Qwen2 models (float32) and the bundled model, prompts of several lengths, early_stopping
True/False/"never", length penalties other than 1, with EOS reached and without: the returned
beams, their order and token ids equal transformers'; their scores agree to 1e-4. Beams share
blocks while they run (fewer used than unshared copies would need) and fsck is clean after.
Preemption, takeover, executor restarts, refusals, aborts and beam groups taking turns:
test_beam_lifecycle.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hf_reference import reference_beams, reference_greedy

from pagedserve.common.params import SamplingParams

from .beam_harness import (
    PROBE,
    VOCAB,
    assert_same_beams,
    beam_params,
    make_engine,
)
from .helpers import assert_pool_clean, run_all, settle
from .test_with_executor import make_prompts

pytestmark = pytest.mark.usefixtures("offline")  # nothing is looked up on a hub

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
