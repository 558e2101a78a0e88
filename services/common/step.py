"""The scheduler -> executor step, as dataclasses (the core's form of executor.proto).

One `StepInput` per model forward. A request's prompt, parameters and block table go once,
in a `NewRequestData`; after that, `CachedRequestData` carries only the blocks appended to
its table and how many tokens to compute. The executor keeps each request's tokens between
steps and appends every token it samples, so the scheduler never sends generated ids back.

Sampling rule: a sequence gets a token in `StepOutput.sampled` exactly when, after the step,
`num_computed_tokens == len(prompt) + len(outputs)` (its scheduled tokens reached the end of
what is known); a chunk in the middle of a prompt samples nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from pagedserve.common.params import SamplingParams


@dataclass(slots=True)
class NewRequestData:
    """A sequence the executor has not seen, or must re-learn (preemption, executor restart)."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated before this (re)start, appended after the prompt
    sampling: SamplingParams
    block_ids: list[int]  # the whole block table
    num_computed_tokens: int  # leading tokens already in the pool (prefix-cache hit)
    num_scheduled_tokens: int  # tokens to compute now, starting at num_computed_tokens
    num_beam_candidates: int = 0  # beam search: candidates to return with each sampled token
    # Beam search: the held sequence this one continues; then the prompt is empty and the
    # tokens are the parent's first num_computed_tokens, then output_token_ids (executor.proto).
    fork_of: str = ""


@dataclass(slots=True)
class CachedRequestData:
    """A sequence the executor holds: only what changed since the last step."""

    request_id: str
    new_block_ids: list[int]  # appended to the block table
    num_scheduled_tokens: int
    num_computed_tokens: int  # what the scheduler believes is computed before this step


@dataclass(slots=True)
class StepInput:
    step_id: int
    epoch: str  # the executor epoch the scheduler believes in; "" skips the check
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    forget_request_ids: list[str] = field(default_factory=list)  # applied before the forward
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst), before the forward
    fence: int = 0  # the sender's fencing token (0: none); a lower one than seen before is refused
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device, cpu) block, first of all
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (cpu, device) block, after swap_out
    forget_all: bool = False  # drop every held request first (a scheduler that took the pool over)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(r.num_scheduled_tokens for r in self.new_requests) + sum(
            r.num_scheduled_tokens for r in self.cached_requests
        )


@dataclass(slots=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # best first
    rank: int | None = None  # 1-based, in the whole vocabulary (prompt logprobs set it)


@dataclass(slots=True)
class SampledToken:
    request_id: str
    token_id: int
    logprobs: TokenLogprobs | None = None
    # Beam search: the best (token id, log_softmax of the raw logits), best first.
    beam_candidates: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class PromptLogprobs:
    """Prompt-token logprobs one step computed for one sequence: `logprobs[i]` is prompt token
    `first_token_index + i`'s (the logits at the position before it, raw: no temperature)."""

    request_id: str
    first_token_index: int  # >= 1: the first prompt token has nothing before it
    logprobs: list[TokenLogprobs] = field(default_factory=list)


@dataclass(slots=True)
class StepOutput:
    epoch: str
    sampled: list[SampledToken] = field(default_factory=list)
    execute_seconds: float = 0.0
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ExecutorInfo:
    model: str
    architecture: str
    dtype: str
    vocab_size: int
    max_model_len: int
    num_blocks: int
    block_size: int
    epoch: str
    eos_token_ids: tuple[int, ...]
    attention_backend: str
    device: str
    num_cpu_blocks: int = 0  # the swap space; 0: the executor cannot swap


class ExecutorClient(Protocol):
    """How a scheduler reaches an executor: over gRPC, or in-process in tests."""

    async def info(self) -> ExecutorInfo: ...

    async def execute_step(self, step: StepInput) -> StepOutput:
        """Run one step. Raises `FailedPrecondition` on an epoch mismatch, `InvalidArgument`
        for a malformed step (executor state then untouched), `Unavailable` when unreachable."""
        ...

    async def close(self) -> None: ...


# --- proto conversion (the wire edge) -------------------------------------------------


def logprobs_to_proto(lp: TokenLogprobs):
    from pagedserve.v1 import common_pb2

    return common_pb2.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        top=[common_pb2.TopLogprob(token_id=t, logprob=p) for t, p in lp.top],
        rank=lp.rank,
    )


def logprobs_from_proto(msg) -> TokenLogprobs:
    rank = msg.rank if msg.HasField("rank") else None
    return TokenLogprobs(msg.token_id, msg.logprob, [(t.token_id, t.logprob) for t in msg.top], rank)


def step_to_proto(step: StepInput):
    from pagedserve.v1 import executor_pb2

    return executor_pb2.ExecuteStepRequest(
        step_id=step.step_id,
        epoch=step.epoch,
        new_requests=[
            executor_pb2.NewRequest(
                request_id=r.request_id,
                prompt_token_ids=r.prompt_token_ids,
                output_token_ids=r.output_token_ids,
                sampling=r.sampling.to_proto(),
                block_ids=r.block_ids,
                num_computed_tokens=r.num_computed_tokens,
                num_scheduled_tokens=r.num_scheduled_tokens,
                num_beam_candidates=r.num_beam_candidates,
                fork_of=r.fork_of,
            )
            for r in step.new_requests
        ],
        cached_requests=[
            executor_pb2.CachedRequest(
                request_id=r.request_id,
                new_block_ids=r.new_block_ids,
                num_scheduled_tokens=r.num_scheduled_tokens,
                num_computed_tokens=r.num_computed_tokens,
            )
            for r in step.cached_requests
        ],
        forget_request_ids=step.forget_request_ids,
        block_copies=[executor_pb2.BlockCopy(src=s, dst=d) for s, d in step.block_copies],
        total_num_scheduled_tokens=step.total_num_scheduled_tokens,
        fence=step.fence,
        swap_out=[executor_pb2.BlockCopy(src=s, dst=d) for s, d in step.swap_out],
        swap_in=[executor_pb2.BlockCopy(src=s, dst=d) for s, d in step.swap_in],
        forget_all=step.forget_all,
    )


def step_from_proto(msg) -> tuple[StepInput, int]:
    """Returns the step and the total_num_scheduled_tokens the sender claimed (to be checked)."""
    step = StepInput(
        step_id=msg.step_id,
        epoch=msg.epoch,
        new_requests=[
            NewRequestData(
                request_id=r.request_id,
                prompt_token_ids=list(r.prompt_token_ids),
                output_token_ids=list(r.output_token_ids),
                sampling=SamplingParams.from_proto(r.sampling),
                block_ids=list(r.block_ids),
                num_computed_tokens=r.num_computed_tokens,
                num_scheduled_tokens=r.num_scheduled_tokens,
                num_beam_candidates=r.num_beam_candidates,
                fork_of=r.fork_of,
            )
            for r in msg.new_requests
        ],
        cached_requests=[
            CachedRequestData(
                request_id=r.request_id,
                new_block_ids=list(r.new_block_ids),
                num_scheduled_tokens=r.num_scheduled_tokens,
                num_computed_tokens=r.num_computed_tokens,
            )
            for r in msg.cached_requests
        ],
        forget_request_ids=list(msg.forget_request_ids),
        block_copies=[(c.src, c.dst) for c in msg.block_copies],
        fence=msg.fence,
        swap_out=[(c.src, c.dst) for c in msg.swap_out],
        swap_in=[(c.src, c.dst) for c in msg.swap_in],
        forget_all=msg.forget_all,
    )
    return step, msg.total_num_scheduled_tokens


def output_to_proto(out: StepOutput):
    from pagedserve.v1 import common_pb2, executor_pb2

    return executor_pb2.ExecuteStepResponse(
        epoch=out.epoch,
        sampled=[
            executor_pb2.SampledToken(
                request_id=s.request_id,
                token_id=s.token_id,
                logprob=logprobs_to_proto(s.logprobs) if s.logprobs is not None else None,
                beam_candidates=[common_pb2.TopLogprob(token_id=t, logprob=p) for t, p in s.beam_candidates],
            )
            for s in out.sampled
        ],
        execute_seconds=out.execute_seconds,
        prompt_logprobs=[
            executor_pb2.PromptLogprobs(
                request_id=p.request_id,
                first_token_index=p.first_token_index,
                logprobs=[logprobs_to_proto(lp) for lp in p.logprobs],
            )
            for p in out.prompt_logprobs
        ],
    )


def output_from_proto(msg) -> StepOutput:
    return StepOutput(
        epoch=msg.epoch,
        sampled=[
            SampledToken(
                s.request_id,
                s.token_id,
                logprobs_from_proto(s.logprob) if s.HasField("logprob") else None,
                [(c.token_id, c.logprob) for c in s.beam_candidates],
            )
            for s in msg.sampled
        ],
        execute_seconds=msg.execute_seconds,
        prompt_logprobs=[
            PromptLogprobs(p.request_id, p.first_token_index, [logprobs_from_proto(lp) for lp in p.logprobs])
            for p in msg.prompt_logprobs
        ],
    )


def info_to_proto(info: ExecutorInfo):
    from pagedserve.v1 import executor_pb2

    return executor_pb2.ExecutorInfoResponse(
        model=info.model,
        architecture=info.architecture,
        dtype=info.dtype,
        vocab_size=info.vocab_size,
        max_model_len=info.max_model_len,
        num_blocks=info.num_blocks,
        block_size=info.block_size,
        epoch=info.epoch,
        eos_token_ids=list(info.eos_token_ids),
        attention_backend=info.attention_backend,
        device=info.device,
        num_cpu_blocks=info.num_cpu_blocks,
    )


def info_from_proto(msg) -> ExecutorInfo:
    return ExecutorInfo(
        model=msg.model,
        architecture=msg.architecture,
        dtype=msg.dtype,
        vocab_size=msg.vocab_size,
        max_model_len=msg.max_model_len,
        num_blocks=msg.num_blocks,
        block_size=msg.block_size,
        epoch=msg.epoch,
        eos_token_ids=tuple(msg.eos_token_ids),
        attention_backend=msg.attention_backend,
        device=msg.device,
        num_cpu_blocks=msg.num_cpu_blocks,
    )
