"""Structured output in the executor: compile, mask, advance, replay, and the engine end to end
on the bundled model (its tokenizer gives the grammar its vocabulary)."""

from __future__ import annotations

import json
import logging

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from pagedserve.common.params import SamplingParams
from pagedserve.common.step import CachedRequestData, NewRequestData, StepInput
from pagedserve.executor import sampler
from pagedserve.executor.grammar import StructuredOutputs

SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}, "n": {"type": "integer", "maximum": 9}},
    "required": ["color", "n"],
    "additionalProperties": False,
}
ANSWER = '{"color": "green", "n": 7}'


@pytest.fixture(scope="module")
def tokenizer(bundled_model_path: str):
    return AutoTokenizer.from_pretrained(bundled_model_path)


@pytest.fixture
def outputs(bundled_model_path: str, tokenizer) -> StructuredOutputs:
    return StructuredOutputs(bundled_model_path, len(tokenizer), (tokenizer.eos_token_id,))


def _params(kind: str, spec: str) -> SamplingParams:
    return SamplingParams(temperature=0.0, structured_kind=kind, structured_spec=spec)


def _allowed(outputs: StructuredOutputs, matcher) -> set[int]:
    mask = outputs.fill([matcher])
    logits = torch.zeros(1, outputs.vocab_size)
    mask.apply(logits)
    return set(torch.nonzero(logits[0] == 0).flatten().tolist())


def test_compile_once_per_spec(outputs: StructuredOutputs) -> None:
    first = outputs.compile("json_schema", json.dumps(SCHEMA))
    assert outputs.compile("json_schema", json.dumps(SCHEMA)) is first
    assert outputs.compile("regex", "[a-z]+") is not first


def test_mask_advance_and_end(outputs: StructuredOutputs, tokenizer, caplog) -> None:
    eos = tokenizer.eos_token_id
    matcher = outputs.start("r", _params("json_schema", json.dumps(SCHEMA)), [])
    allowed = _allowed(outputs, matcher)
    # Only tokens whose text can start the object: "{" and nothing else (no free whitespace).
    assert allowed and all(tokenizer.decode([t]).startswith("{") for t in allowed)
    assert eos not in allowed
    ids = tokenizer.encode(ANSWER, add_special_tokens=False)
    for token in ids:
        assert token in _allowed(outputs, matcher)
        outputs.commit([], [matcher] if "r" not in outputs.matchers else [], {"r": token})
    # The object is complete: EOS is the only token left, which ends the sequence.
    assert _allowed(outputs, matcher) == {eos}
    outputs.commit([], [], {"r": eos})
    assert matcher.grammar.is_terminated()
    # A step planned ahead runs the request once more after its EOS: its token is no error (the
    # matcher stays as it was, and nothing is logged) and the mask still allows only EOS.
    with caplog.at_level(logging.ERROR, logger="pagedserve.executor.grammar"):
        outputs.commit([], [], {"r": eos})
    assert caplog.records == [] and matcher.grammar is not None
    assert _allowed(outputs, matcher) == {eos}
    outputs.commit(["r"], [], {})
    assert not outputs.matchers


def test_replay_gives_the_same_mask(outputs: StructuredOutputs, tokenizer) -> None:
    ids = tokenizer.encode(ANSWER, add_special_tokens=False)
    params = _params("json_schema", json.dumps(SCHEMA))
    stepped = outputs.start("a", params, [])
    outputs.commit([], [stepped], {})
    for token in ids[:5]:
        outputs.commit([], [], {"a": token})
    replayed = outputs.start("b", params, ids[:5])
    assert _allowed(outputs, replayed) == _allowed(outputs, stepped)
    assert len(_allowed(outputs, replayed)) < outputs.vocab_size


def test_choice_regex_and_bad_grammar(outputs: StructuredOutputs, tokenizer) -> None:
    eos = tokenizer.eos_token_id
    choice = outputs.start("c", _params("choice", json.dumps(["yes", "no"])), [])
    first = _allowed(outputs, choice)
    assert first and all(
        "yes".startswith(tokenizer.decode([t])) or "no".startswith(tokenizer.decode([t])) for t in first
    )
    digits = outputs.start("d", _params("regex", "[0-9]{2}"), [])
    assert all(tokenizer.decode([t]).isdigit() for t in _allowed(outputs, digits))
    # A grammar the executor cannot compile ends its request (EOS only) instead of failing the step.
    broken = outputs.start("e", _params("grammar", 'root ::= "a" | undefined_rule'), [])
    assert broken.grammar is None and _allowed(outputs, broken) == {eos}
    # A replayed token the grammar refuses: the same.
    refused = outputs.start(
        "f", _params("regex", "[0-9]{2}"), tokenizer.encode("ab", add_special_tokens=False)
    )
    assert refused.grammar is None and _allowed(outputs, refused) == {eos}


def test_sampler_mask_leaves_other_rows_alone(outputs: StructuredOutputs) -> None:
    """One bitmask for the batch: constrained rows obey it, the others sample what they would alone."""
    torch.manual_seed(0)
    logits = torch.randn(3, outputs.vocab_size)
    greedy = SamplingParams(temperature=0.0)
    constrained = _params("regex", "[0-9]{2}")
    matcher = outputs.start("x", constrained, [])
    mask = outputs.fill([None, matcher, None])
    both = sampler.sample(logits, [greedy, constrained, greedy], [[1]] * 3, [[]] * 3, (2,), mask=mask)
    alone = sampler.sample(logits, [greedy] * 3, [[1]] * 3, [[]] * 3, (2,))
    assert [both[0], both[2]] == [alone[0], alone[2]]
    assert both[1][0] in _allowed(outputs, matcher)
    assert both[1][0] == max(_allowed(outputs, matcher), key=lambda t: logits[1, t].item())


def test_torch_unpacking_equals_the_cpu_kernel(outputs: StructuredOutputs, tokenizer) -> None:
    """The accelerator path (plain torch ops) masks exactly what xgrammar's CPU kernel masks."""
    eos = tokenizer.eos_token_id
    matchers = [
        outputs.start("a", _params("json_schema", json.dumps(SCHEMA)), []),
        None,
        outputs.start("b", _params("regex", "[0-9]{2}"), []),
        outputs.start("c", _params("grammar", "root ::= missing"), []),  # EOS only
    ]
    mask = outputs.fill(matchers)
    logits = torch.randn(4, outputs.vocab_size)
    kernel, unpacked = logits.clone(), logits.clone()
    mask.apply(kernel)
    mask.apply_unpacked(unpacked)
    assert torch.equal(kernel, unpacked)
    assert torch.equal(kernel[1], logits[1]), "an unconstrained row is untouched"
    assert torch.isfinite(kernel[3]).nonzero().flatten().tolist() == [eos]


def _drive(
    engine,
    request_id: str,
    prompt: list[int],
    params: SamplingParams,
    max_new: int,
    restart_after: int | None = None,
) -> list[int]:
    """Greedy decode one request on `engine`; optionally forget it after `restart_after` tokens and
    send it again as a new request carrying its output so far (as after a preemption)."""
    eos = set(engine.runner.eos_token_ids)
    block_size = engine.pool.block_size
    blocks = list(range(16))
    outputs: list[int] = []
    step_id = 0
    new = NewRequestData(request_id, prompt, [], params, blocks, 0, len(prompt))
    step = StepInput(step_id, engine.epoch, new_requests=[new])
    computed = len(prompt)
    while True:
        out = engine.execute_step(step)
        step_id += 1
        (token,) = [s.token_id for s in out.sampled]
        outputs.append(token)
        if token in eos or len(outputs) == max_new:
            break
        if restart_after is not None and len(outputs) == restart_after:
            known = len(prompt) + len(outputs)
            new = NewRequestData(request_id, prompt, list(outputs), params, blocks, 0, known)
            step = StepInput(step_id, engine.epoch, new_requests=[new], forget_request_ids=[request_id])
            computed = known
            restart_after = None
            continue
        assert computed + 1 <= len(blocks) * block_size
        step = StepInput(
            step_id, engine.epoch, cached_requests=[CachedRequestData(request_id, [], 1, computed)]
        )
        computed += 1
    engine.execute_step(StepInput(step_id, engine.epoch, forget_request_ids=[request_id]))
    return outputs


def test_engine_json_schema_output_and_restart(make_engine, bundled_model_path: str, tokenizer) -> None:
    engine = make_engine(bundled_model_path, max_model_len=256)
    prompt = tokenizer.encode("def f(x):\n    return", add_special_tokens=False)
    params = _params("json_schema", json.dumps(SCHEMA))
    tokens = _drive(engine, "j", prompt, params, max_new=40)
    assert tokens[-1] in engine.runner.eos_token_ids, "the grammar ends the output with EOS"
    jsonschema.validate(json.loads(tokenizer.decode(tokens[:-1])), SCHEMA)
    assert not engine.structured.matchers, "forgetting the request drops its matcher"
    # Recompute from the middle: the matcher replays the output and the rest is the same.
    assert _drive(engine, "j2", prompt, params, max_new=40, restart_after=4) == tokens
    # Unconstrained greedy is what it was without any constraint in the engine.
    plain = SamplingParams(temperature=0.0, max_tokens=8)
    assert _drive(engine, "p", prompt, plain, max_new=8) == _drive(
        make_engine(bundled_model_path, max_model_len=256), "p", prompt, plain, max_new=8
    )


def test_eos_the_grammar_did_not_allow_ends_the_matcher_without_an_error(
    outputs: StructuredOutputs, tokenizer, caplog
) -> None:
    """The sampler's EOS for a row that its mask and allowed_token_ids left with nothing: the
    request's own doing, logged at INFO; any other token the grammar refuses is still an ERROR."""
    eos = tokenizer.eos_token_id
    for token, level in (
        (eos, logging.INFO),
        (tokenizer.encode("x", add_special_tokens=False)[0], logging.ERROR),
    ):
        outputs.commit(["r"], [], {})
        matcher = outputs.start("r", _params("json_schema", json.dumps(SCHEMA)), [])
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pagedserve.executor.grammar"):
            outputs.commit([], [matcher], {"r": token})  # the object has not even started
        assert matcher.grammar is None, "the request may only end now"
        assert [r.levelno for r in caplog.records] == [level]
