"""Checking a step against the executor's request states, without changing anything.

`plan_step` is the whole of the executor's validation: it either returns a `StepPlan` (what to drop,
copy and run) or raises `InvalidArgument` naming the request and the problem. It never mutates the
states it reads, so a rejected step leaves the executor exactly as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from pagedserve.common.errors import InvalidArgument
from pagedserve.common.params import SamplingParams
from pagedserve.common.step import NewRequestData, StepInput

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RequestState:
    """One sequence the executor holds between steps.

    Invariants: token_ids == prompt_token_ids + output_token_ids; the KV of token_ids[:num_computed_tokens]
    is in the pool at the slots block_ids maps them to; num_computed_tokens <= len(block_ids) * block_size.
    """

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    token_ids: list[int]
    sampling: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    num_beam_candidates: int = 0  # beam search: candidates returned with each sampled token


@dataclass(slots=True)
class ScheduledRequest:
    state: RequestState  # held (cached request) or fresh (new request); planning never changes it
    block_ids: list[int]  # the block table once this step's blocks are added
    num_tokens: int  # tokens computed this step, from state.num_computed_tokens on
    samples: bool  # the step reaches the end of the known tokens, so a token is sampled


@dataclass(slots=True)
class StepPlan:
    forget: list[str] = field(default_factory=list)  # held ids to drop
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst)
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device, cpu)
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (cpu, device)
    scheduled: list[ScheduledRequest] = field(default_factory=list)  # new requests first, then cached

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


def plan_step(
    step: StepInput,
    requests: dict[str, RequestState],
    *,
    num_blocks: int,
    block_size: int,
    vocab_size: int,
    max_model_len: int,
    max_num_batched_tokens: int,
    claimed_total_tokens: int | None = None,
    num_cpu_blocks: int = 0,
) -> StepPlan:
    """Validates the whole step; returns the plan or raises InvalidArgument. Reads `requests` only."""
    where = f"step {step.step_id}"

    def bad(message: str, field_name: str | None = None) -> InvalidArgument:
        return InvalidArgument(f"{where}: {message}", field=field_name)

    def check_blocks(who: str, block_ids: list[int]) -> None:
        for b in block_ids:
            if not 0 <= b < num_blocks:
                raise bad(f"{who}: block id {b} is outside the pool [0, {num_blocks})", "block_ids")

    def schedule(who: str, state: RequestState, block_ids: list[int], num_tokens: int) -> ScheduledRequest:
        start = state.num_computed_tokens
        end = start + num_tokens
        if num_tokens < 1:
            raise bad(f"{who}: num_scheduled_tokens={num_tokens} must be >= 1", "num_scheduled_tokens")
        if end > len(state.token_ids):
            raise bad(
                f"{who}: {start} computed + {num_tokens} scheduled tokens exceed the {len(state.token_ids)} "
                "tokens known",
                "num_scheduled_tokens",
            )
        if end > max_model_len:
            raise bad(
                f"{who}: {end} tokens would exceed max_model_len={max_model_len}", "num_scheduled_tokens"
            )
        if end > len(block_ids) * block_size:
            raise bad(
                f"{who}: {end} tokens need {-(-end // block_size)} blocks of {block_size} but the block table "
                f"has {len(block_ids)}",
                "block_ids",
            )
        return ScheduledRequest(state, block_ids, num_tokens, samples=end == len(state.token_ids))

    total = step.total_num_scheduled_tokens
    if claimed_total_tokens is not None and claimed_total_tokens != total:
        raise bad(
            f"total_num_scheduled_tokens={claimed_total_tokens} but the requests schedule {total} tokens",
            "total_num_scheduled_tokens",
        )
    if total > max_num_batched_tokens:
        raise bad(
            f"{total} scheduled tokens exceed max_num_batched_tokens={max_num_batched_tokens}",
            "total_num_scheduled_tokens",
        )

    plan = StepPlan()
    # Finished ids the executor never saw (aborted before their first step, or sent after a
    # restart) are nothing to drop: forgetting is idempotent.
    forget = set(step.forget_request_ids)
    plan.forget = [r for r in dict.fromkeys(step.forget_request_ids) if r in requests]

    copy_dsts: set[int] = set()
    for src, dst in step.block_copies:
        check_blocks(f"block copy ({src} -> {dst})", [src, dst])
        if dst in copy_dsts:
            raise bad(f"block {dst} is the destination of more than one copy", "block_copies")
        copy_dsts.add(dst)
    sources = {src for src, _ in step.block_copies}
    if copy_dsts & sources:
        raise bad(f"blocks {sorted(copy_dsts & sources)} are both copied from and copied to", "block_copies")
    plan.block_copies = list(step.block_copies)
    plan.swap_out = _check_swaps(step.swap_out, "swap_out", num_blocks, num_cpu_blocks, bad)
    plan.swap_in = _check_swaps(step.swap_in, "swap_in", num_cpu_blocks, num_blocks, bad)
    if {c for _, c in plan.swap_out} & {c for c, _ in plan.swap_in}:
        # The swap-outs run first: a CPU block read by a swap-in would already be overwritten.
        raise bad("a CPU block is both swapped out to and swapped in from in one step", "swap_in")

    seen: set[str] = set()
    for r in step.new_requests:
        who = f"new request {r.request_id!r}"
        if r.request_id in seen:
            raise bad(f"{who} appears more than once in the step", "request_id")
        seen.add(r.request_id)
        if r.request_id in requests and r.request_id not in forget:
            raise bad(f"{who} is already held; list it in forget_request_ids to re-send it", "request_id")
        if r.fork_of:
            prompt_ids, token_ids = _forked_tokens(who, r, requests, bad)
            checked = r.output_token_ids
        else:
            if not r.prompt_token_ids:
                raise bad(f"{who} has an empty prompt", "prompt_token_ids")
            prompt_ids = r.prompt_token_ids
            token_ids = checked = [*r.prompt_token_ids, *r.output_token_ids]
        bad_ids = [t for t in checked if not 0 <= t < vocab_size]
        if bad_ids:
            raise bad(
                f"{who}: token id {bad_ids[0]} is outside the vocabulary [0, {vocab_size})",
                "prompt_token_ids",
            )
        if len(token_ids) > max_model_len:
            raise bad(
                f"{who} has {len(token_ids)} tokens, more than max_model_len={max_model_len}",
                "prompt_token_ids",
            )
        try:
            r.sampling.validate(vocab_size)
        except InvalidArgument as e:
            raise bad(f"{who}: {e.message}", e.field) from e
        check_blocks(who, r.block_ids)
        if len(set(r.block_ids)) != len(r.block_ids):
            raise bad(f"{who}: the block table {r.block_ids} lists a block twice", "block_ids")
        if r.num_computed_tokens < 0:
            raise bad(
                f"{who}: num_computed_tokens={r.num_computed_tokens} is negative", "num_computed_tokens"
            )
        if not 0 <= r.num_beam_candidates <= vocab_size:
            raise bad(
                f"{who}: num_beam_candidates={r.num_beam_candidates} is not in [0, vocab_size={vocab_size}]",
                "num_beam_candidates",
            )
        state = RequestState(
            request_id=r.request_id,
            prompt_token_ids=list(prompt_ids),
            output_token_ids=token_ids[len(prompt_ids) :],
            token_ids=token_ids,
            sampling=r.sampling,
            block_ids=list(r.block_ids),
            num_computed_tokens=r.num_computed_tokens,
            num_beam_candidates=r.num_beam_candidates,
        )
        plan.scheduled.append(schedule(who, state, state.block_ids, r.num_scheduled_tokens))

    for r in step.cached_requests:
        who = f"cached request {r.request_id!r}"
        if r.request_id in seen:
            raise bad(f"{who} appears more than once in the step", "request_id")
        seen.add(r.request_id)
        state = requests.get(r.request_id)
        if state is None or r.request_id in forget:
            why = "is forgotten in this same step" if state is not None else "is not known to this executor"
            raise bad(f"{who} {why}; send it as a new request", "request_id")
        if r.num_computed_tokens != state.num_computed_tokens:
            raise bad(
                f"{who}: num_computed_tokens={r.num_computed_tokens} but the executor has computed "
                f"{state.num_computed_tokens}",
                "num_computed_tokens",
            )
        check_blocks(who, r.new_block_ids)
        block_ids = [*state.block_ids, *r.new_block_ids]
        if r.new_block_ids and len(set(block_ids)) != len(block_ids):
            raise bad(f"{who}: new blocks {r.new_block_ids} repeat a block of its table", "new_block_ids")
        plan.scheduled.append(schedule(who, state, block_ids, r.num_scheduled_tokens))

    _check_no_shared_writes(plan, block_size, bad)
    return plan


def _check_swaps(
    pairs: list[tuple[int, int]], name: str, num_src: int, num_dst: int, bad
) -> list[tuple[int, int]]:
    """Each (src, dst) inside its pool ([0, num_src) and [0, num_dst)); destinations distinct."""
    if pairs and (num_src == 0 or num_dst == 0):
        raise bad(f"{name}: this executor has no swap space (--swap-space 0)", name)
    dsts: set[int] = set()
    for src, dst in pairs:
        if not (0 <= src < num_src and 0 <= dst < num_dst):
            raise bad(
                f"{name} ({src} -> {dst}) is outside the pools ([0, {num_src}) -> [0, {num_dst}))", name
            )
        if dst in dsts:
            raise bad(f"{name}: block {dst} is the destination of more than one swap", name)
        dsts.add(dst)
    return list(pairs)


def _check_no_shared_writes(plan: StepPlan, block_size: int, bad) -> None:
    """Two sequences writing the same slot would corrupt each other (a missing copy-on-write)."""
    writers: dict[
        int, list[tuple[int, int, str]]
    ] = {}  # block id -> [(first offset, end offset, request id)]
    for s in plan.scheduled:
        start, end = s.state.num_computed_tokens, s.state.num_computed_tokens + s.num_tokens
        for index in range(start // block_size, (end - 1) // block_size + 1):
            lo = max(start, index * block_size) - index * block_size
            hi = min(end, (index + 1) * block_size) - index * block_size
            block = s.block_ids[index]
            for other_lo, other_hi, other in writers.get(block, []):
                if lo < other_hi and other_lo < hi:
                    raise bad(
                        f"requests {other!r} and {s.state.request_id!r} both write slots of block {block} "
                        "(a shared block needs copy-on-write first)",
                        "block_ids",
                    )
            writers.setdefault(block, []).append((lo, hi, s.state.request_id))


def _forked_tokens(
    who: str, r: NewRequestData, requests: dict[str, RequestState], bad: Callable[..., InvalidArgument]
) -> tuple[list[int], list[int]]:
    """(prompt, all tokens) of a beam forked from a held request: the parent's prompt and first
    num_computed_tokens tokens (the KV it shares), then the new request's output_token_ids."""
    parent = requests.get(r.fork_of)
    if parent is None:
        raise bad(f"{who} forks {r.fork_of!r}, which this executor does not hold", "fork_of")
    if r.prompt_token_ids:
        raise bad(f"{who} forks {r.fork_of!r}: its prompt_token_ids must be empty", "prompt_token_ids")
    base = r.num_computed_tokens
    if not len(parent.prompt_token_ids) <= base <= len(parent.token_ids):
        raise bad(
            f"{who} forks {r.fork_of!r} at num_computed_tokens={base}, outside its outputs "
            f"[{len(parent.prompt_token_ids)}, {len(parent.token_ids)}]",
            "num_computed_tokens",
        )
    return parent.prompt_token_ids, [*parent.token_ids[:base], *r.output_token_ids]
