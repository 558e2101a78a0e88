"""The scheduling policy: which sequences run each step, and their blocks.

Iteration-level continuous batching under a token budget (`max_num_batched_tokens`) and a
sequence cap (`max_num_seqs`): running sequences first, oldest first, then waiting ones by
(priority, arrival), preempted ones ahead of all. A prompt longer than the budget left is
computed in chunks. When blocks run out the newest running sequence's group (its request's
running sequences) is preempted, by recompute — its blocks are freed (full ones stay in the
prefix cache, so the recompute is mostly cache hits) and it goes back to the front of the
queue — or by swap to CPU blocks, which are swapped back in before new admissions (swap.py).

A step is `schedule()` -> (the engine ships the block manager's log to the replica and runs
the executor, concurrently) -> `update(output)` (completion.py). Planning asks the in-process
`BlockManager`, which answers at once with real block ids: a plan is never revised after
the fact. What happens when a pool or a scheduler is lost is in recovery.py.

No grpc and no redis here: the executor and the replica belong to the engine.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import NamedTuple

from pagedserve.common.errors import InvalidArgument, ResourceExhausted
from pagedserve.common.params import SamplingParams
from pagedserve.common.step import CachedRequestData, NewRequestData, StepInput
from pagedserve.scheduler.admission import check_admissible
from pagedserve.scheduler.beam_steps import BeamMixin
from pagedserve.scheduler.block_manager import BlockManager
from pagedserve.scheduler.completion import CompletionMixin
from pagedserve.scheduler.config import SchedulerLimits
from pagedserve.scheduler.hashing import BlockHasher, model_salt, token_str
from pagedserve.scheduler.output import RequestStream
from pagedserve.scheduler.pending_prefix import PendingBlocks
from pagedserve.scheduler.recovery import RecoveryMixin
from pagedserve.scheduler.request import BEAM_INDEX, PROMPT_INDEX, Request, Sequence, SequenceStatus
from pagedserve.scheduler.swap import PreemptionPolicy, SwapMixin
from pagedserve.scheduler.waiting import WaitQueue

log = logging.getLogger(__name__)

RUNNING = SequenceStatus.RUNNING
# Prompt positions per step whose logits are kept for prompt logprobs: each is a [V] float row
# in the executor (152k-token vocabularies: 0.6 MB each), so a long prompt's rows come in chunks.
MAX_PROMPT_LOGPROB_ROWS = 512


@dataclass(slots=True)
class StepCounters:
    """What the policy counts as it runs (reported through Stats)."""

    num_steps: int = 0
    num_preemptions: int = 0
    prefix_hit_tokens: int = 0
    prefix_query_tokens: int = 0
    generated_tokens: int = 0
    executor_restarts: int = 0
    num_resumed: int = 0  # requests taken over from a previous scheduler
    live_tokens: int = 0  # tokens held by the running sequences, last step
    kv_utilization: float = 0.0  # live tokens / allocated slots of the running sequences, last step
    swap_out_blocks: int = 0  # blocks copied device -> CPU
    swap_in_blocks: int = 0  # blocks copied CPU -> device


class ScheduledStep(NamedTuple):
    step_input: StepInput | None  # None: nothing to run this step
    seqs: list[tuple[Sequence, int]]  # each scheduled sequence and its num_scheduled_tokens


class Scheduler(CompletionMixin, RecoveryMixin, BeamMixin, SwapMixin):
    def __init__(self, limits: SchedulerLimits, epoch: str, policy: PreemptionPolicy | None = None) -> None:
        self.limits = limits
        self.policy = policy or PreemptionPolicy(limits.preemption_mode, limits.swap_min_tokens)
        self.epoch = epoch
        self.block_size = limits.block_size
        self.hasher = BlockHasher(model_salt(limits.model, limits.block_size), limits.block_size)
        self.blocks = BlockManager(limits.num_blocks, limits.block_size, limits.num_cpu_blocks)
        self.pending = PendingBlocks(self.hasher)  # full blocks planned steps compute, not cached yet
        self.requests: dict[str, Request] = {}
        self.detached: dict[str, Request] = {}  # resumed from the replica, waiting for their client
        self.running: list[Sequence] = []  # admission order: the last one is preempted first
        self.waiting = WaitQueue()
        self.num_queued = 0  # requests not started yet
        self.stats = StepCounters()
        self.forget_ids: list[str] = []  # the executor drops these at the next step
        self.forget_all = False  # the next step tells the executor to drop everything it holds
        # (seq, token, logprobs, num_computed_tokens) taken by update() and not yet handed to
        # the streams and the replica log (see completion.publish)
        self.unpublished: list[tuple] = []
        self.needs_full_write = False  # the replica must get the whole state, not a log
        self.fence = 0  # the pool lease's fencing token, carried by every step (0: no lease)
        self._aborts: list[str] = []
        self._prompt_rows_left = MAX_PROMPT_LOGPROB_ROWS  # reset by every schedule()
        self._arrivals = itertools.count()
        self._step_ids = itertools.count(1)
        self._init_swap()

    # --- requests in and out ---------------------------------------------------------------

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams, priority: int = 0
    ) -> RequestStream:
        """Queue a request; raises InvalidArgument when it can never run, ResourceExhausted
        when the queue is full. Nothing is allocated before it is admitted."""
        check_admissible(self.limits, request_id, prompt_token_ids, sampling)
        self._check_new_id(request_id)
        request = self._new_request(request_id, list(prompt_token_ids), sampling, priority)
        request.seqs = request.initial_sequences()
        self._enqueue(request)
        return request.stream

    def _check_new_id(self, request_id: str) -> None:
        if request_id in self.requests or request_id in self.detached:
            raise InvalidArgument(f"request_id {request_id!r} is already in use", field="request_id")
        if self.num_queued >= self.limits.max_queued_requests:
            raise ResourceExhausted(
                f"the scheduler queue is full ({self.limits.max_queued_requests} requests waiting)"
            )

    def _new_request(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams, priority: int
    ) -> Request:
        return Request(
            request_id, prompt_token_ids, sampling, priority, next(self._arrivals), RequestStream(request_id)
        )

    def _enqueue(self, request: Request) -> None:
        """Make a request live: queued, each unfinished sequence waiting, its state written."""
        self.requests[request.request_id] = request
        self.num_queued += 1
        for seq in request.seqs:
            if seq.status == SequenceStatus.WAITING:
                self.waiting.push(seq)
            self._save(seq)

    def abort(self, request_id: str) -> bool:
        """Abort a request at the next step boundary; False when it is not known."""
        request = self.requests.get(request_id) or self.detached.get(request_id)
        if request is None or request.aborted:
            return False
        request.aborted = True
        self._aborts.append(request_id)
        return True

    def fail_all(self, error: Exception) -> None:
        """End every in-flight request's stream with `error`, aborted now (its blocks are freed
        at the next step)."""
        for request_id, request in list(self.requests.items()):
            request.stream.fail(error)
            self.abort(request_id)
        self._apply_aborts()

    def _apply_aborts(self) -> None:
        for request_id in self._aborts:
            self._abort_now(request_id)
        self._aborts.clear()

    def load_record(self) -> str:
        """The pool's load as the registry stores it: "running,waiting,tokens,ms"."""
        waiting = len(self.waiting) + self.num_swapped_seqs
        return f"{len(self.running)},{waiting},{self.stats.live_tokens},{int(time.time() * 1000)}"

    def has_work(self) -> bool:
        return bool(
            self.running
            or self.waiting
            or self._aborts
            or len(self.blocks.log)
            or self.forget_ids
            or self.unpublished
            or self.swapped
        )

    # --- planning ----------------------------------------------------------------------

    def schedule(self) -> ScheduledStep:
        """Plan one step: blocks for the running sequences (preempting the newest group when
        short), then swapped groups back in, then admissions, and the executor's step with the
        deltas it needs."""
        self._apply_aborts()
        planned: list[tuple[Sequence, int, list[int]]] = []  # (seq, tokens, new block ids)
        copies: list[tuple[int, int]] = []
        budget = self.limits.max_num_batched_tokens
        max_seqs = self.limits.max_num_seqs
        running = self.running
        preempted = False
        self._prompt_rows_left = MAX_PROMPT_LOGPROB_ROWS
        i = 0
        while i < len(running) and budget > 0 and len(planned) < max_seqs:
            seq = running[i]
            if seq.index == BEAM_INDEX and len(seq.request.seqs) > 1:  # all of its beams, or none
                i, budget, cut = self._plan_beams(i, planned, copies, budget)
                preempted = preempted or cut
                continue
            num_tokens = self._cap_prompt_rows(seq, min(seq.target_len - seq.num_computed_tokens, budget))
            if num_tokens <= 0:
                i += 1
                continue
            new_ids = self._grow(seq, num_tokens, copies)
            while new_ids is None:
                group, refund = self._preempt_group(running[-1], seq, planned, copies)
                budget += refund
                preempted = True
                if seq in group:
                    break
                new_ids = self._grow(seq, num_tokens, copies)
            if new_ids is None:
                break  # its group was the newest left: everything after it is preempted too
            i = running.index(seq)  # group members before it may have left
            planned.append((seq, num_tokens, new_ids))
            self.pending.note(seq, seq.num_computed_tokens + num_tokens)
            budget -= num_tokens
            i += 1
        # Resuming or admitting right after preempting would only thrash (and a swap-in must
        # not share a step with a swap-out).
        if not preempted:
            budget = self._resume_swapped(planned, copies, budget)
            if not self.swapped:
                self._admit_waiting(planned, budget)
        return self._build_step(planned, copies)

    def _cap_prompt_rows(self, seq: Sequence, num_tokens: int) -> int:
        """At most the step's prompt rows left for a sequence that needs prompt logprobs."""
        if num_tokens <= 0 or not seq.needs_prompt_logprobs:
            return num_tokens
        num_tokens = min(num_tokens, self._prompt_rows_left)
        self._prompt_rows_left -= num_tokens
        return num_tokens

    def _grow(self, seq: Sequence, num_tokens: int, copies: list[tuple[int, int]]) -> list[int] | None:
        """Blocks for `num_tokens` more tokens: a copy of the shared partial last block (the
        next token goes into it), then fresh blocks. The new ids, or None (nothing changed)."""
        bs = self.block_size
        computed = seq.num_computed_tokens
        table = seq.block_table
        num_new = max((computed + num_tokens + bs - 1) // bs - len(table), 0)
        shared = bool(computed % bs and table and self.blocks.ref_cnt(table[-1]) > 1)
        if num_new + shared > self.blocks.num_available:
            return None
        if shared:
            copy = self.blocks.cow(seq.seq_id)
            assert copy is not None and copy.src >= 0, "cow after a check that a block is free"
            table[-1] = copy.dst
            copies.append((copy.src, copy.dst))
            self._forget(seq)  # its table changed in place: the executor gets it whole again
        new_ids = self.blocks.allocate(seq.seq_id, num_new) if num_new else []
        assert new_ids is not None, "allocate after a check that the blocks are free"
        table.extend(new_ids)
        return new_ids

    def _admit_waiting(self, planned: list[tuple[Sequence, int, list[int]]], budget: int) -> None:
        bs = self.block_size
        while budget > 0 and len(self.running) < self.limits.max_num_seqs:
            seq = self.waiting.peek()
            if seq is None:
                break
            target = seq.target_len
            # Hits only within the first target - 1 tokens: the last one is computed to sample.
            num_full = (target - 1) // bs
            if seq.needs_prompt_logprobs:
                num_full = 0  # every prompt position's logits are needed: no hits
            if len(seq.block_hashes) < num_full:
                start = len(seq.block_hashes) * bs
                self.hasher.extend(seq.block_hashes, seq.token_ids(start, num_full * bs))
            chain = [
                (seq.block_hashes[j], token_str(seq.token_ids(j * bs, (j + 1) * bs))) for j in range(num_full)
            ]
            chunk = min(target, budget)
            if seq.needs_prompt_logprobs:
                chunk = min(chunk, self._prompt_rows_left)
                if chunk <= 0:
                    break  # this step's prompt rows are spent; it stays first in the queue
                self._prompt_rows_left -= chunk
            shared: list[int] = []
            if len(self.pending) and chain:  # blocks being computed continue the cache's hits
                cached = self.blocks.cached_prefix(chain)
                shared = self.pending.run(chain, cached)
                if shared:
                    chain = chain[:cached]
            admission = self.blocks.admit(seq.seq_id, chain, target, chunk, shared)
            if admission is None:
                break
            self.waiting.pop()
            seq.status = RUNNING
            self.running.append(seq)
            seq.block_table = admission.block_ids
            hit = admission.num_hit_blocks * bs
            seq.num_computed_tokens = hit
            seq.num_registered_blocks = admission.num_hit_blocks
            num_tokens = min(target - hit, chunk)
            self.stats.prefix_query_tokens += target
            self.stats.prefix_hit_tokens += hit
            self._mark_started(seq.request, hit)
            planned.append((seq, num_tokens, []))
            self.pending.note(seq, hit + num_tokens)
            budget -= num_tokens

    def _build_step(
        self, planned: list[tuple[Sequence, int, list[int]]], copies: list[tuple[int, int]]
    ) -> ScheduledStep:
        # (`forget_all` rides with the next step there is anyway: nothing new runs before it.)
        if not (planned or self.forget_ids or self.swap_out_pairs or self.swap_in_pairs):
            return ScheduledStep(None, [])
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        for seq, num_tokens, new_ids in planned:
            if seq.in_executor:
                cached_reqs.append(
                    CachedRequestData(seq.seq_id, new_ids, num_tokens, seq.num_computed_tokens)
                )
            else:
                new_reqs.append(
                    self._beam_fork_data(seq, num_tokens)
                    or NewRequestData(
                        seq.seq_id,
                        seq.prompt_token_ids,
                        list(seq.output_token_ids),
                        seq.sampling,
                        list(seq.block_table),
                        seq.num_computed_tokens,
                        num_tokens,
                        self._num_beam_candidates(seq),
                    )
                )
                seq.in_executor = True
            # The step's tokens count as computed from now on, so that the next step can be
            # planned while this one runs; a step that fails resets the pool (engine.py).
            seq.num_computed_tokens += num_tokens
            if seq.index != PROMPT_INDEX and seq.num_computed_tokens == seq.num_tokens + seq.num_pending:
                seq.num_pending += 1  # it samples in this step
        # (With nothing scheduled the step only tells the executor what to forget.)
        forget, self.forget_ids = self.forget_ids, []
        swap_out, swap_in = self._take_swaps()
        step = StepInput(
            next(self._step_ids),
            self.epoch,
            new_reqs,
            cached_reqs,
            forget,
            copies,
            self.fence,
            swap_out,
            swap_in,
            self.forget_all,
        )
        self.forget_all = False
        return ScheduledStep(step, [(seq, n) for seq, n, _ in planned])

    def _preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks and put it back at the front of the queue (recompute)."""
        if seq.index == BEAM_INDEX:
            self._preempt_beams(seq.request)
            return
        self.blocks.free(seq.seq_id)
        self._forget(seq)
        seq.reset_for_recompute()  # a token in flight for it is dropped; the recompute samples it again
        self.blocks.log.update(seq.seq_id, "1", 0, ())
        self.running.remove(seq)
        self.waiting.push_front(seq)
        self.stats.num_preemptions += 1

    # --- bookkeeping -------------------------------------------------------------------

    def _mark_started(self, request: Request, hit_tokens: int) -> None:
        if request.started:
            return
        request.started = True
        self.num_queued -= 1
        request.cached_prompt_tokens = min(hit_tokens, len(request.prompt_token_ids))
        request.stream.set_cached_prompt_tokens(request.cached_prompt_tokens)

    def _forget(self, seq: Sequence) -> None:
        if seq.in_executor:
            self.forget_ids.append(seq.seq_id)
            seq.in_executor = False
