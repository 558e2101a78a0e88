"""A malformed step is rejected whole: InvalidArgument naming the problem (FailedPrecondition for a
stale epoch), with every pool tensor and every request state exactly as before.

Each bad step also carries valid parts (a finished id, a block copy, a valid new request), so an
engine that applied a step piece by piece before noticing the bad part would be caught.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from executor_harness import GREEDY, make_prompts

from pagedserve.common.errors import FailedPrecondition, InvalidArgument
from pagedserve.common.params import SamplingParams
from pagedserve.common.step import CachedRequestData, NewRequestData, StepInput
from pagedserve.executor.engine import ExecutorEngine

BLOCK = 8
NUM_BLOCKS = 32


@pytest.fixture
def engine(tiny_model_dir, make_engine) -> ExecutorEngine:
    """An engine holding 'a' (8 prompt tokens + 1 sampled: a full block, slot 8 not yet written) and
    'b' (12 prompt tokens + 1 sampled), both prefilled."""
    engine = make_engine(
        tiny_model_dir("llama"),
        block_size=BLOCK,
        num_kv_blocks=NUM_BLOCKS,
        max_model_len=64,
        max_num_batched_tokens=40,
    )
    a, b = make_prompts((8, 12), 512, seed=3)
    step = StepInput(
        0,
        engine.epoch,
        new_requests=[
            NewRequestData("a", a, [], GREEDY, [5], 0, 8),
            NewRequestData("b", b, [], GREEDY, [9, 2], 0, 12),
        ],
    )
    assert len(engine.execute_step(step).sampled) == 2
    return engine


def snapshot(engine: ExecutorEngine) -> tuple[list[torch.Tensor], dict]:
    tensors = [t.clone() for t in (*engine.pool.k_caches, *engine.pool.v_caches)]
    return tensors, copy.deepcopy(engine.requests)


def assert_untouched(engine: ExecutorEngine, before: tuple[list[torch.Tensor], dict]) -> None:
    tensors, states = before
    for old, new in zip(tensors, (*engine.pool.k_caches, *engine.pool.v_caches), strict=True):
        assert torch.equal(old, new), "a pool tensor changed"
    assert engine.requests == states, "a request state changed"


def valid_new(request_id: str = "c", blocks: list[int] | None = None) -> NewRequestData:
    return NewRequestData(request_id, [7, 8, 9], [], GREEDY, blocks or [20], 0, 3)


def step_with(
    engine: ExecutorEngine,
    *,
    new: list[NewRequestData] | None = None,
    cached: list[CachedRequestData] | None = None,
    copies: list[tuple[int, int]] | None = None,
    finished: list[str] | None = None,
    epoch: str | None = None,
) -> StepInput:
    """Valid parts by default: finish 'b', copy block 9 -> 30, add 'c', decode 'a' into a new block."""
    return StepInput(
        step_id=7,
        epoch=engine.epoch if epoch is None else epoch,
        new_requests=[valid_new()] if new is None else new,
        cached_requests=[CachedRequestData("a", [11], 1, 8)] if cached is None else cached,
        forget_request_ids=["b"] if finished is None else finished,
        block_copies=[(9, 30)] if copies is None else copies,
    )


def a_decode(**overrides) -> CachedRequestData:
    fields = {"request_id": "a", "new_block_ids": [11], "num_scheduled_tokens": 1, "num_computed_tokens": 8}
    return CachedRequestData(**{**fields, **overrides})


BAD_STEPS: dict[str, tuple[Callable[[ExecutorEngine], StepInput], str]] = {
    "unknown cached id": (lambda e: step_with(e, cached=[a_decode(request_id="zz")]), "'zz' is not known"),
    "cached id forgotten in the same step": (
        lambda e: step_with(e, cached=[a_decode(), CachedRequestData("b", [], 1, 12)]),
        "'b' is forgotten in this same step",
    ),
    "duplicate new id": (lambda e: step_with(e, new=[valid_new(), valid_new(blocks=[21])]), "more than once"),
    "duplicate cached id": (
        lambda e: step_with(e, cached=[a_decode(), a_decode(new_block_ids=[12])]),
        "more than once",
    ),
    "new id already held": (lambda e: step_with(e, new=[valid_new("a")]), "'a' is already held"),
    "new block id out of range": (
        lambda e: step_with(e, new=[valid_new(blocks=[NUM_BLOCKS])]),
        "block id 32 is outside",
    ),
    "negative block id": (
        lambda e: step_with(e, cached=[a_decode(new_block_ids=[-1])]),
        "block id -1 is outside",
    ),
    "copy source out of range": (lambda e: step_with(e, copies=[(99, 30)]), "block id 99 is outside"),
    "copy destination twice": (
        lambda e: step_with(e, copies=[(9, 30), (2, 30)]),
        "destination of more than one",
    ),
    "copy destination also a source": (
        lambda e: step_with(e, copies=[(9, 30), (30, 31)]),
        "both copied from and",
    ),
    "block listed twice": (lambda e: step_with(e, new=[valid_new(blocks=[20, 20])]), "lists a block twice"),
    "slots beyond the block table": (
        lambda e: step_with(e, cached=[a_decode(new_block_ids=[])]),
        "block table has 1",
    ),
    "more tokens than known (cached)": (
        lambda e: step_with(e, cached=[a_decode(num_scheduled_tokens=2)]),
        "exceed the 9 tokens known",
    ),
    "more tokens than known (new)": (
        lambda e: step_with(e, new=[NewRequestData("c", [7, 8, 9], [], GREEDY, [20], 0, 4)]),
        "exceed the 3 tokens known",
    ),
    "num_computed mismatch": (
        lambda e: step_with(e, cached=[a_decode(num_computed_tokens=7)]),
        "has computed 8",
    ),
    "zero scheduled tokens": (
        lambda e: step_with(e, cached=[a_decode(num_scheduled_tokens=0)]),
        "must be >= 1",
    ),
    "token outside the vocabulary": (
        lambda e: step_with(e, new=[NewRequestData("c", [7, 512], [], GREEDY, [20], 0, 2)]),
        "token id 512 is outside",
    ),
    "empty prompt": (
        lambda e: step_with(e, new=[NewRequestData("c", [], [], GREEDY, [20], 0, 1)]),
        "empty prompt",
    ),
    "invalid sampling params": (
        lambda e: step_with(
            e, new=[NewRequestData("c", [7], [], SamplingParams(temperature=-1), [20], 0, 1)]
        ),
        "temperature must be a finite number >= 0",
    ),
    "prompt over max_model_len": (
        lambda e: step_with(e, new=[NewRequestData("c", [7] * 65, [], GREEDY, list(range(20, 29)), 0, 30)]),
        "more than max_model_len=64",
    ),
    "over max_num_batched_tokens": (
        lambda e: step_with(e, new=[NewRequestData("c", [7] * 41, [], GREEDY, list(range(20, 26)), 0, 41)]),
        "exceed max_num_batched_tokens=40",
    ),
    "two requests writing one slot": (
        lambda e: step_with(e, new=[NewRequestData("c", [7, 8], [], GREEDY, [11], 0, 2)]),
        "both write slots of block 11",
    ),
}


@pytest.mark.parametrize("case", list(BAD_STEPS))
def test_malformed_step_is_rejected_and_changes_nothing(engine: ExecutorEngine, case: str) -> None:
    build, message = BAD_STEPS[case]
    before = snapshot(engine)
    with pytest.raises(InvalidArgument, match=message):
        engine.execute_step(build(engine))
    assert_untouched(engine, before)
    # The same valid parts alone still run afterwards.
    out = engine.execute_step(step_with(engine))
    assert sorted(s.request_id for s in out.sampled) == ["a", "c"]


def test_total_token_mismatch(engine: ExecutorEngine) -> None:
    before = snapshot(engine)
    step = step_with(engine)
    with pytest.raises(InvalidArgument, match="total_num_scheduled_tokens=5 but the requests schedule 4"):
        engine.execute_step(step, claimed_total_tokens=5)
    assert_untouched(engine, before)


def test_epoch_mismatch_is_failed_precondition(engine: ExecutorEngine) -> None:
    before = snapshot(engine)
    with pytest.raises(FailedPrecondition, match="epoch 'stale' is not this executor's epoch"):
        engine.execute_step(step_with(engine, epoch="stale"))
    assert_untouched(engine, before)
    # An empty epoch skips the check.
    assert len(engine.execute_step(step_with(engine, epoch="")).sampled) == 2


def test_a_failing_forward_leaves_states_untouched(engine: ExecutorEngine, monkeypatch) -> None:
    states = copy.deepcopy(engine.requests)

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(engine.runner, "execute", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        engine.execute_step(step_with(engine))
    assert engine.requests == states


def test_a_held_request_may_not_grow_past_max_model_len() -> None:
    from pagedserve.executor.step_plan import RequestState, plan_step

    tokens = list(range(3, 68))  # 65 known tokens, 64 computed: the next one would be position 64
    state = RequestState("x", tokens[:60], tokens[60:], tokens, GREEDY, list(range(9)), 64)
    step = StepInput(3, "", cached_requests=[CachedRequestData("x", [], 1, 64)])
    limits = dict(num_blocks=16, block_size=8, vocab_size=512, max_num_batched_tokens=64)
    with pytest.raises(InvalidArgument, match="65 tokens would exceed max_model_len=64"):
        plan_step(step, {"x": state}, max_model_len=64, **limits)
    assert plan_step(step, {"x": state}, max_model_len=65, **limits).scheduled[0].samples


def test_forget_all_drops_every_held_request_with_the_step(engine: ExecutorEngine) -> None:
    """A scheduler that took the pool over re-sends what it knows as new requests and tells the
    executor to forget the rest (ids it may never have heard of)."""
    resent = NewRequestData("a", [7, 8, 9], [], GREEDY, [20], 0, 3)  # 'a' again, as a new request
    step = StepInput(8, engine.epoch, new_requests=[resent], forget_all=True)
    out = engine.execute_step(step)
    assert [s.request_id for s in out.sampled] == ["a"]
    assert sorted(engine.requests) == ["a"]  # 'b' is gone, 'a' is the new one
    assert engine.requests["a"].prompt_token_ids == [7, 8, 9]


def test_a_malformed_forget_all_step_changes_nothing(engine: ExecutorEngine) -> None:
    before = snapshot(engine)
    bad = StepInput(8, engine.epoch, new_requests=[valid_new("c", [NUM_BLOCKS + 5])], forget_all=True)
    with pytest.raises(InvalidArgument):
        engine.execute_step(bad)
    assert_untouched(engine, before)
