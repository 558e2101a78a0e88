"""Requests and the sequences the scheduler runs for them.

A `Request` is what a client submitted; a `Sequence` is what runs on the executor. A request
with n == 1 has one sequence. A request with n > 1 first runs one prompt sequence that
computes all but the last prompt token and samples nothing; then n choice sequences fork
from it, sharing its blocks, and each computes the last prompt token itself (after a
copy-on-write of the shared partial block) with its own seed.

There is no prefill or decode phase: a sequence only has `num_computed_tokens`, and each step
computes some of the tokens after it (the whole prompt, a chunk of it, or one new token).

A beam-search request (beam_steps.py) runs its beams as sequences with index BEAM_INDEX: one
over the prompt first, then `width` beams that replace each other every step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from enum import IntEnum

from pagedserve.common.outputs import FinishReason
from pagedserve.common.params import SamplingParams
from pagedserve.common.step import TokenLogprobs
from pagedserve.scheduler.beam import BeamSearch
from pagedserve.scheduler.hashing import ROOT_HASH, BlockHasher
from pagedserve.scheduler.output import RequestStream

log = logging.getLogger(__name__)

PROMPT_INDEX = -1  # choice index of the prompt sequence of an n > 1 request
BEAM_INDEX = -2  # index of every sequence of a beam-search request (its choices exist at the end)
_SEED_STRIDE = 0x9E3779B97F4A7C15  # odd, so distinct choice indices give distinct seeds
_SEED_MASK = (1 << 63) - 1


class SequenceStatus(IntEnum):
    WAITING = 1  # queued, new or preempted: holds no blocks
    RUNNING = 2  # holds a block table
    FINISHED = 3  # stopped, or aborted
    SWAPPED = 4  # preempted by swap: its KV is in CPU blocks (swap.py), it holds no device blocks


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index`: choice 0 keeps the request's seed, the others derive theirs."""
    if seed is None or index == 0:
        return seed
    return (seed + index * _SEED_STRIDE) & _SEED_MASK


@dataclass(slots=True, eq=False)
class Sequence:
    seq_id: str  # the executor's request id
    request: Request
    index: int  # choice index, or PROMPT_INDEX
    sampling: SamplingParams  # n == 1, this choice's seed
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[str] = field(default_factory=list)  # chained hashes of the known full blocks
    num_registered_blocks: int = 0  # leading full blocks known to the prefix cache
    status: SequenceStatus = SequenceStatus.WAITING
    in_executor: bool = False  # the executor holds its state (else it gets a NewRequestData)
    # Tokens sampled in a step whose output has not arrived yet (0 or 1): the executor holds
    # it, so the next step can compute it before the scheduler knows its value.
    num_pending: int = 0
    finish_reason: FinishReason = FinishReason.NONE
    cumulative_logprob: float = 0.0  # a beam's score: the sum of its tokens' log-probabilities
    fork_parent: str = ""  # a beam: the sequence it continues (the executor may fork it from there)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_token_ids) + len(self.output_token_ids)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Its request still waits for prompt logprobs, so every prompt position must be computed
        (no prefix-cache hits). Once any token is out, what the client missed is not recomputed."""
        request = self.request
        return (
            request.sampling.prompt_logprobs is not None
            and not request.prompt_logprobs_sent
            and not self.output_token_ids
        )

    @property
    def target_len(self) -> int:
        """Tokens this sequence has to compute before it samples (the prompt sequence of an
        n > 1 request stops one short of the prompt and never samples); a token sampled in a
        step still in flight counts (the executor has it)."""
        if self.index == PROMPT_INDEX:
            return len(self.request.prompt_token_ids) - 1
        if self.index == BEAM_INDEX:  # its next token is chosen from the candidates in flight
            return self.num_tokens
        return self.num_tokens + self.num_pending

    def reset_for_recompute(self) -> None:
        """Hold nothing and start over: no blocks, nothing computed or pending, not in the
        executor, waiting (its outputs so far stay: a recompute continues them)."""
        self.block_table = []
        self.num_computed_tokens = 0
        self.num_registered_blocks = 0
        self.num_pending = 0
        self.in_executor = False
        self.status = SequenceStatus.WAITING

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + outputs."""
        prompt = self.request.prompt_token_ids
        if end <= len(prompt):
            return prompt[start:end]
        if start >= len(prompt):
            return self.output_token_ids[start - len(prompt) : end - len(prompt)]
        return prompt[start:] + self.output_token_ids[: end - len(prompt)]

    def take_full_blocks(self, hasher: BlockHasher) -> list[tuple[int, str, str, list[int]]]:
        """(index, hash, parent hash, token ids) of each block that became full since the last
        call, to be registered in the prefix cache; they count as registered from now on."""
        bs = hasher.block_size
        full = min(self.num_computed_tokens, self.num_tokens) // bs  # blocks whose every token is known
        if full <= self.num_registered_blocks:
            return []
        hashes = self.block_hashes
        if len(hashes) < full:
            hasher.extend(hashes, self.token_ids(len(hashes) * bs, full * bs))
        blocks = [
            (j, hashes[j], hashes[j - 1] if j else ROOT_HASH, self.token_ids(j * bs, (j + 1) * bs))
            for j in range(self.num_registered_blocks, full)
        ]
        self.num_registered_blocks = full
        return blocks

    def check_stop(self, token_id: int, eos_token_ids: frozenset[int], max_model_len: int) -> bool:
        """After `token_id` was appended: whether the sequence is done (sets finish_reason)."""
        params = self.sampling
        num_out = len(self.output_token_ids)
        if num_out >= params.min_tokens:
            if (not params.ignore_eos and token_id in eos_token_ids) or token_id in params.stop_token_ids:
                self.finish_reason = FinishReason.STOP
                return True
        if num_out >= params.max_tokens or self.num_tokens >= max_model_len:
            self.finish_reason = FinishReason.LENGTH
            return True
        return False


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    priority: int
    arrival: int  # submission order, for first come, first served among equal priorities
    stream: RequestStream
    seqs: list[Sequence] = field(default_factory=list)  # live sequences (the prompt one, or the choices)
    started: bool = False  # some sequence was admitted (the request left the queue)
    cached_prompt_tokens: int | None = None  # prefix-cache hit of its first admission
    completion_tokens: int = 0
    num_choices_left: int = 0
    aborted: bool = False
    # With sampling.prompt_logprobs: entry i is prompt token i + 1's, gathered from the steps'
    # chunks in order; handed to the stream once all len(prompt) - 1 are in.
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs_sent: bool = False

    def add_prompt_logprobs(self, first_token_index: int, logprobs: list[TokenLogprobs]) -> None:
        """Take one step's chunk; a chunk computed again (after a preemption) adds only what is
        new, and the whole list goes to the stream once complete."""
        if self.prompt_logprobs_sent:
            return
        skip = len(self.prompt_logprobs) + 1 - first_token_index
        if skip < 0:  # positions are computed in order and every output is read: not expected
            log.warning(
                "%s: prompt logprobs from token %d, but only %d are in; dropped",
                self.request_id,
                first_token_index,
                len(self.prompt_logprobs),
            )
            return
        self.prompt_logprobs.extend(logprobs[skip:])
        self.flush_prompt_logprobs()

    def flush_prompt_logprobs(self) -> None:
        if not self.prompt_logprobs_sent and len(self.prompt_logprobs) >= len(self.prompt_token_ids) - 1:
            self.stream.set_prompt_logprobs(self.prompt_logprobs)
            self.prompt_logprobs_sent = True

    beam: BeamSearch | None = None  # beam search's state, when sampling.use_beam_search
    num_beam_seqs: int = 0  # beam sequences made so far (their ids are unique per request)

    def choice(self, index: int) -> Sequence:
        params = replace(self.sampling, n=1, seed=choice_seed(self.sampling.seed, index))
        suffix = "" if self.sampling.n == 1 else f"#{index}"
        return Sequence(f"{self.request_id}{suffix}", self, index, params)

    def prompt_sequence(self) -> Sequence:
        params = replace(self.sampling, n=1, max_tokens=1, min_tokens=0)
        return Sequence(f"{self.request_id}#prompt", self, PROMPT_INDEX, params)

    def fork_choices(self, parent: Sequence) -> list[Sequence]:
        """The n choices, each sharing the prompt sequence's blocks and progress."""
        children = [self.choice(i) for i in range(self.sampling.n)]
        for child in children:
            child.block_table = list(parent.block_table)
            child.num_computed_tokens = parent.num_computed_tokens
            child.block_hashes = list(parent.block_hashes)
            child.num_registered_blocks = parent.num_registered_blocks
            child.status = SequenceStatus.RUNNING
        self.seqs = children
        return children

    def beam_sequence(self, parent: Sequence | None = None, token_id: int = -1) -> Sequence:
        """The beam over the prompt (no parent), or `parent`'s continuation with `token_id`,
        sharing its progress (the blocks are forked by the caller)."""
        seq = Sequence(f"{self.request_id}#b{self.num_beam_seqs}", self, BEAM_INDEX, self.sampling)
        self.num_beam_seqs += 1
        if parent is not None:
            seq.fork_parent = parent.seq_id
            seq.output_token_ids = [*parent.output_token_ids, token_id]
            seq.block_table = list(parent.block_table)
            seq.num_computed_tokens = parent.num_computed_tokens
            seq.block_hashes = list(parent.block_hashes)
            seq.num_registered_blocks = parent.num_registered_blocks
            seq.status = SequenceStatus.RUNNING
        return seq

    def initial_sequences(self) -> list[Sequence]:
        """One sequence per choice, or the shared prompt sequence when n > 1 and there is a
        prompt prefix to share (a one-token prompt has none)."""
        n = self.sampling.n
        self.num_choices_left = n
        if self.sampling.use_beam_search:  # (again after a preemption: the search starts over)
            s = self.sampling
            self.beam = BeamSearch(n, s.length_penalty, s.early_stopping)
            return [self.beam_sequence()]
        if n > 1 and len(self.prompt_token_ids) > 1:
            return [self.prompt_sequence()]
        return [self.choice(i) for i in range(n)]
