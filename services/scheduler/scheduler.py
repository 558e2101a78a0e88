"""The scheduling policy: which sequences run each step, and their blocks.

Iteration-level continuous batching under a token budget (`max_num_batched_tokens`) and a
sequence cap (`max_num_seqs`): running sequences first, oldest first, then waiting ones by
(priority, arrival), preempted ones ahead of all. A prompt longer than the budget left is
computed in chunks. When blocks run out the newest running sequence is preempted by
recompute: its blocks are freed (full ones stay in the prefix cache, so the recompute is
mostly cache hits) and it goes back to the front of the queue.

A step is `schedule()` -> one `BlockPool.apply` -> (the caller runs the executor) ->
`update(output)`. Everything the pool must learn from a step (hash registrations of blocks
that became full, request-state writes, frees of finished sequences) is queued and goes out
with the next step's single `apply`. The policy plans with local counts: a mirror of every
block's ref_cnt, kept exact from the block tables it holds, and the pool's available count
from the last reply (lowered conservatively while planning, since prefix hits are only
known once the pool answers).

No grpc and no redis here: the pool and the executor are passed in.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from dataclasses import dataclass
from typing import NamedTuple

from pagedserve.common.errors import InvalidArgument, ResourceExhausted
from pagedserve.common.params import SamplingParams
from pagedserve.common.step import CachedRequestData, NewRequestData, StepInput, StepOutput
from pagedserve.scheduler.admission import check_admissible
from pagedserve.scheduler.block_pool import BlockPool, PoolCounts, StepOps
from pagedserve.scheduler.config import SchedulerLimits
from pagedserve.scheduler.hashing import BlockHasher, model_salt, token_str
from pagedserve.scheduler.ledger import BlockLedger
from pagedserve.scheduler.output import FinishReason, RequestStream, Usage
from pagedserve.scheduler.request import PROMPT_INDEX, Request, Sequence, SequenceStatus
from pagedserve.scheduler.waiting import WaitQueue

log = logging.getLogger(__name__)


RUNNING = int(SequenceStatus.RUNNING)  # as written to the pool


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(slots=True)
class SchedulerStats:
    num_steps: int = 0
    num_preemptions: int = 0
    prefix_hit_tokens: int = 0
    prefix_query_tokens: int = 0
    generated_tokens: int = 0
    executor_restarts: int = 0
    kv_utilization: float = 0.0  # live tokens / allocated slots of the running sequences, last step


@dataclass(slots=True)
class _Planned:
    seq: Sequence
    num_tokens: int  # tokens to compute (for an admission: the most it may compute)
    admit: int = -1  # handles into the StepResult
    alloc: int = -1
    cow: int = -1


class ScheduledStep(NamedTuple):
    step_input: StepInput | None  # None: nothing to run this step
    seqs: list[tuple[Sequence, int]]  # each scheduled sequence and its num_scheduled_tokens


class Scheduler:
    def __init__(self, limits: SchedulerLimits, pool: BlockPool, epoch: str) -> None:
        self.limits = limits
        self.pool = pool
        self.epoch = epoch
        self.block_size = limits.block_size
        self.hasher = BlockHasher(model_salt(limits.model, limits.block_size), limits.block_size)
        self.requests: dict[str, Request] = {}
        self.running: list[Sequence] = []  # admission order: the last one is preempted first
        self.waiting = WaitQueue()
        self.num_queued = 0  # requests not started yet
        self.ledger = BlockLedger(limits.num_blocks)  # planning counts (see ledger.py)
        self.counts = PoolCounts(limits.num_blocks, 0, 0)  # the pool's, after the last step
        self.stats = SchedulerStats()
        self._ops = StepOps()  # queued for the next apply
        self._finished_ids: list[str] = []  # the executor should forget these
        self._aborts: list[str] = []
        self._pool_suspect = False  # a step's apply failed: reset the pool before the next one
        self._arrivals = itertools.count()
        self._step_ids = itertools.count(1)

    # --- requests in and out ---------------------------------------------------------------

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams, priority: int = 0
    ) -> RequestStream:
        """Queue a request; raises InvalidArgument when it can never run, ResourceExhausted
        when the queue is full. Nothing is allocated before it is admitted."""
        lim = self.limits
        check_admissible(lim, request_id, prompt_token_ids, sampling)
        if request_id in self.requests:
            raise InvalidArgument(f"request_id {request_id!r} is already in use", field="request_id")
        if self.num_queued >= lim.max_queued_requests:
            raise ResourceExhausted(
                f"the scheduler queue is full ({lim.max_queued_requests} requests waiting)"
            )
        request = Request(
            request_id,
            list(prompt_token_ids),
            sampling,
            priority,
            next(self._arrivals),
            RequestStream(request_id),
        )
        request.seqs = request.initial_sequences()
        self.requests[request_id] = request
        self.num_queued += 1
        for seq in request.seqs:
            self.waiting.push(seq)
            self._save(seq)
        return request.stream

    def abort(self, request_id: str) -> bool:
        """Abort a request at the next step boundary; False when it is not known."""
        request = self.requests.get(request_id)
        if request is None or request.aborted:
            return False
        request.aborted = True
        self._aborts.append(request_id)
        return True

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self._aborts or len(self._ops) or self._finished_ids)

    # --- planning ----------------------------------------------------------------------

    def schedule(self) -> ScheduledStep:
        """Plan one step and apply its block operations (one pool round trip)."""
        if self._pool_suspect:
            self.reset_pool(self.epoch, executor_lost=False)
        ops, self._ops = self._ops, StepOps()
        for request_id in self._aborts:
            self._abort_now(request_id, ops)
        self._aborts.clear()
        planned: list[_Planned] = []
        budget = self.limits.max_num_batched_tokens
        max_seqs = self.limits.max_num_seqs
        running = self.running
        ledger = self.ledger
        blocks_needed = self._blocks_needed
        preempted = False
        i = 0
        while i < len(running) and budget > 0 and len(planned) < max_seqs:
            seq = running[i]
            num_tokens = min(seq.target_len - seq.num_computed_tokens, budget)
            if num_tokens <= 0:
                i += 1
                continue
            new_blocks, cow = blocks_needed(seq, num_tokens)
            while new_blocks + cow > ledger.num_available:
                self._preempt(running[-1], ops)
                preempted = True
                if seq.status != SequenceStatus.RUNNING:
                    break
                new_blocks, cow = self._blocks_needed(seq, num_tokens)  # a shared block may be its own now
            if seq.status != SequenceStatus.RUNNING:
                break  # it was the newest left: everything after it is preempted too
            plan = _Planned(seq, num_tokens)
            if cow:
                plan.cow = ops.cow(seq.seq_id)
            if new_blocks:
                plan.alloc = ops.allocate(seq.seq_id, new_blocks)
            ledger.num_available -= new_blocks + cow
            budget -= num_tokens
            planned.append(plan)
            i += 1
        if not preempted:  # admitting right after preempting would only thrash
            budget = self._plan_admissions(ops, planned, budget)
        if not planned and not len(ops):
            return self._build_step([], None)
        try:
            result = self.pool.apply(ops)
        except Exception:
            # Did the script run? Unknown: start the pool over once it answers again.
            self._pool_suspect = True
            raise
        self.counts = result.counts
        self.ledger.num_available = result.counts.num_available
        return self._build_step(planned, result)

    def _blocks_needed(self, seq: Sequence, num_tokens: int) -> tuple[int, int]:
        """(fresh blocks to append, 1 if the partial last block needs a copy-on-write else 0)."""
        bs = self.block_size
        computed = seq.num_computed_tokens
        table = seq.block_table
        new_blocks = (computed + num_tokens + bs - 1) // bs - len(table)
        # The next token goes into the partial last block, which another table shares.
        cow = 1 if computed % bs and table and self.ledger.ref_cnt.get(table[-1], 0) > 1 else 0
        return (new_blocks if new_blocks > 0 else 0), cow

    def _plan_admissions(self, ops: StepOps, planned: list[_Planned], budget: int) -> int:
        bs = self.block_size
        ledger = self.ledger
        while budget > 0 and len(self.running) < self.limits.max_num_seqs:
            seq = self.waiting.peek()
            if seq is None:
                break
            target = seq.target_len
            # Hits only within the first target - 1 tokens: the last one is computed to sample.
            num_full = (target - 1) // bs
            if len(seq.block_hashes) < num_full:
                start = len(seq.block_hashes) * bs
                self.hasher.extend(seq.block_hashes, seq.token_ids(start, num_full * bs))
            chunk = min(target, budget)
            k = num_full
            if cdiv(target, bs) > ledger.num_available:
                # Every hit may come out of the LRU: pass only as many as the blocks left allow.
                k = min(k, max(0, (ledger.num_available * bs - chunk) // bs))
            worst = cdiv(min(target, k * bs + chunk), bs)
            if worst > ledger.num_available:
                break
            chain = [(seq.block_hashes[j], token_str(seq.token_ids(j * bs, (j + 1) * bs))) for j in range(k)]
            planned.append(_Planned(seq, chunk, admit=ops.admit(seq.seq_id, chain, target, chunk)))
            self.waiting.pop()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            ledger.num_available -= worst
            budget -= chunk
        return budget

    def _build_step(self, planned: list[_Planned], result) -> ScheduledStep:
        bs = self.block_size
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        copies: list[tuple[int, int]] = []
        scheduled: list[tuple[Sequence, int]] = []
        for plan in planned:
            seq = plan.seq
            new_ids: list[int] = []
            if plan.admit >= 0:
                adm = result[plan.admit]
                if not adm.ok:  # the pool disagreed with the plan: try again next step
                    log.warning("admission of %s refused by the pool; re-queued", seq.seq_id)
                    self.running.remove(seq)
                    seq.status = SequenceStatus.WAITING
                    self.waiting.push_front(seq)
                    continue
                seq.block_table = list(adm.block_ids)
                self.ledger.ref_up(adm.block_ids)
                hit = adm.num_hit_blocks * bs
                seq.num_computed_tokens = hit
                seq.num_registered_blocks = adm.num_hit_blocks
                num_tokens = min(seq.target_len - hit, plan.num_tokens)
                self.stats.prefix_query_tokens += seq.target_len
                self.stats.prefix_hit_tokens += hit
                self._mark_started(seq.request, hit)
            else:
                num_tokens = plan.num_tokens
                copy = result[plan.cow] if plan.cow >= 0 else None
                alloc = result[plan.alloc] if plan.alloc >= 0 else None
                if copy is not None and copy.src >= 0:
                    seq.block_table[-1] = copy.dst
                    self.ledger.ref_down(copy.src)
                    self.ledger.ref_up([copy.dst])
                    copies.append((copy.src, copy.dst))
                    if seq.in_executor:  # its table changed in place: send it whole again
                        self._forget(seq)
                if alloc is not None and alloc.ok:
                    seq.block_table.extend(alloc.block_ids)
                    self.ledger.ref_up(alloc.block_ids)
                    new_ids = alloc.block_ids
                if (copy is not None and not copy.ok) or (alloc is not None and not alloc.ok):
                    # The pool disagreed with the plan; recompute from a clean table.
                    log.warning("blocks for %s refused by the pool; preempted", seq.seq_id)
                    self._preempt(seq, self._ops)
                    continue
            if seq.in_executor:
                cached_reqs.append(
                    CachedRequestData(seq.seq_id, new_ids, num_tokens, seq.num_computed_tokens)
                )
            else:
                new_reqs.append(
                    NewRequestData(
                        seq.seq_id,
                        seq.prompt_token_ids,
                        list(seq.output_token_ids),
                        seq.sampling,
                        list(seq.block_table),
                        seq.num_computed_tokens,
                        num_tokens,
                    )
                )
                seq.in_executor = True
            scheduled.append((seq, num_tokens))
        if not scheduled and not self._finished_ids:
            return ScheduledStep(None, [])
        # (With nothing scheduled the step only tells the executor what to forget.)
        finished, self._finished_ids = self._finished_ids, []
        step = StepInput(next(self._step_ids), self.epoch, new_reqs, cached_reqs, finished, copies)
        return ScheduledStep(step, scheduled)

    # --- results -----------------------------------------------------------------------

    def update(self, step: ScheduledStep, output: StepOutput) -> None:
        """Take one step's sampled tokens: append them, check stops, queue the pool writes."""
        ops = self._ops
        sampled = {s.request_id: s for s in output.sampled}
        eos, max_len = self.limits.eos_token_ids, self.limits.max_model_len
        forked: dict[int, list[Sequence]] = {}
        bs = self.block_size
        running_status = SequenceStatus.RUNNING
        for seq, num_tokens in step.seqs:
            if seq.status != running_status:
                continue
            seq.num_computed_tokens += num_tokens
            if seq.num_computed_tokens // bs > seq.num_registered_blocks:
                self._register_full_blocks(seq, ops)
            if seq.index == PROMPT_INDEX:
                if seq.num_computed_tokens >= seq.target_len:
                    forked[id(seq)] = self._fork_choices(seq, ops)
                else:
                    ops.update(seq.seq_id, SequenceStatus.RUNNING, seq.num_computed_tokens, ())
                continue
            token = sampled.get(seq.seq_id)
            if token is None:
                if seq.num_computed_tokens == seq.num_tokens:
                    log.warning("executor sampled nothing for %s at the end of its tokens", seq.seq_id)
                ops.update(seq.seq_id, SequenceStatus.RUNNING, seq.num_computed_tokens, ())
                continue
            request = seq.request
            token_id = token.token_id
            seq.output_token_ids.append(token_id)
            request.completion_tokens += 1
            done = seq.check_stop(token_id, eos, max_len)
            request.stream.push(
                seq.index,
                [token_id],
                [token.logprobs] if token.logprobs is not None else None,
                seq.finish_reason,
                token_id if seq.finish_reason == FinishReason.STOP else -1,
            )
            if done:
                self._finish(seq, ops)
            else:
                ops.update_token(seq.seq_id, RUNNING, seq.num_computed_tokens, token_id)
        self.stats.generated_tokens += len(output.sampled)
        running: list[Sequence] = []
        live = slots = 0
        for seq in self.running:
            if forked and id(seq) in forked:
                running.extend(forked[id(seq)])
            elif seq.status == running_status:
                running.append(seq)
        for seq in running:
            live += seq.num_computed_tokens
            slots += len(seq.block_table)
        self.running = running
        self.stats.num_steps += 1
        self.stats.kv_utilization = live / (slots * bs) if slots else 0.0

    def _register_full_blocks(self, seq: Sequence, ops: StepOps) -> None:
        for index, block_hash, parent_hash, token_ids in seq.take_full_blocks(self.hasher):
            ops.register(seq.seq_id, index, block_hash, parent_hash, token_ids)

    def _fork_choices(self, parent: Sequence, ops: StepOps) -> list[Sequence]:
        """The prompt sequence is done: n choices share its blocks from here on."""
        request = parent.request
        children = request.fork_choices(parent)
        for child in children:
            ops.fork(parent.seq_id, child.seq_id)
            self.ledger.ref_up(child.block_table)
            self._save(child, ops)
        parent.status = SequenceStatus.FINISHED
        self._release(parent)
        ops.drop(parent.seq_id)
        self._forget(parent)
        return children

    def _finish(self, seq: Sequence, ops: StepOps) -> None:
        """The sequence stopped (or was aborted): free its blocks, forget it; close the request
        when it was the last choice."""
        if seq.status == SequenceStatus.WAITING:
            self.waiting.discard(seq)
        seq.status = SequenceStatus.FINISHED
        self._release(seq)
        ops.drop(seq.seq_id)
        self._forget(seq)
        request = seq.request
        request.num_choices_left -= 1
        if request.num_choices_left > 0:
            return
        self.requests.pop(request.request_id, None)
        if not request.started:
            self.num_queued -= 1
        cached = request.cached_prompt_tokens or 0
        request.stream.finish(Usage(len(request.prompt_token_ids), request.completion_tokens, cached))

    def _abort_now(self, request_id: str, ops: StepOps) -> None:
        request = self.requests.get(request_id)
        if request is None:
            return
        for seq in request.seqs:
            if seq.status == SequenceStatus.FINISHED:
                continue
            if seq.index == PROMPT_INDEX:  # no choice exists yet: end them all
                request.num_choices_left = 1
                for index in range(request.sampling.n):
                    request.stream.push(index, [], None, FinishReason.ABORT)
            else:
                request.stream.push(seq.index, [], None, FinishReason.ABORT)
            seq.finish_reason = FinishReason.ABORT
            self._finish(seq, ops)
        self.running = [s for s in self.running if s.status == SequenceStatus.RUNNING]

    def _preempt(self, seq: Sequence, ops: StepOps) -> None:
        """Free the sequence's blocks and put it back at the front of the queue (recompute)."""
        ops.free(seq.seq_id)
        self._release(seq)
        self._forget(seq)
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0
        seq.status = SequenceStatus.WAITING
        ops.update(seq.seq_id, SequenceStatus.WAITING, 0, ())
        self.running.remove(seq)
        self.waiting.push_front(seq)
        self.stats.num_preemptions += 1

    # --- executor loss -----------------------------------------------------------------

    def reset_pool(self, epoch: str, *, executor_lost: bool = True) -> None:
        """Drop every block and recompute every running sequence with its outputs so far
        (their streams go on): the executor's pool is gone (a new epoch), or the pool in Redis
        can no longer be trusted (a step's apply failed half way). In the latter case the
        executor still holds our sequences and is told to forget them."""
        self.pool.reset(epoch)
        self.epoch = epoch
        self._ops = StepOps()
        forget = (
            [] if executor_lost else self._finished_ids + [s.seq_id for s in self.running if s.in_executor]
        )
        self._finished_ids = forget
        self.ledger.reset(self.limits.num_blocks)
        self.counts = PoolCounts(self.limits.num_blocks, 0, 0)
        for seq in self.running:
            seq.block_table = []
            seq.num_computed_tokens = 0
            seq.num_registered_blocks = 0
            seq.in_executor = False
            seq.status = SequenceStatus.WAITING
        self.waiting.extend_front(self.running)
        self.running = []
        for request in self.requests.values():
            for seq in request.seqs:
                if seq.status != SequenceStatus.FINISHED:
                    self._save(seq)
        self._pool_suspect = False
        if executor_lost:
            self.stats.executor_restarts += 1

    def forget_executor_state(self) -> None:
        """The executor may have lost track of our sequences (a step whose reply was lost, or
        one it refused): the next step drops every running sequence there and re-sends it whole."""
        for seq in self.running:
            self._forget(seq)

    # --- bookkeeping -------------------------------------------------------------------

    def _save(self, seq: Sequence, ops: StepOps | None = None) -> None:
        request = seq.request
        (ops or self._ops).save(
            seq.seq_id,
            prompt_token_ids=request.prompt_token_ids,
            params_json=json.dumps(dataclasses.asdict(seq.sampling), separators=(",", ":")),
            priority=request.priority,
            status=int(seq.status),
            num_computed_tokens=seq.num_computed_tokens,
            output_token_ids=seq.output_token_ids,
        )

    def _mark_started(self, request: Request, hit_tokens: int) -> None:
        if request.started:
            return
        request.started = True
        self.num_queued -= 1
        request.cached_prompt_tokens = min(hit_tokens, len(request.prompt_token_ids))
        request.stream.set_cached_prompt_tokens(request.cached_prompt_tokens)

    def _forget(self, seq: Sequence) -> None:
        if seq.in_executor:
            self._finished_ids.append(seq.seq_id)
            seq.in_executor = False

    def _release(self, seq: Sequence) -> None:
        self.ledger.release(seq.block_table)
        seq.block_table = []
