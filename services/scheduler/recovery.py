"""When something is lost: the executor's pool, the replica, or the scheduler itself.

Part of `Scheduler` (scheduler.py).
- Executor pool lost (a new epoch): every block is dropped and each running sequence is
  recomputed with its outputs so far; streams go on. Swapped-out sequences too: their CPU
  blocks went with the executor, so they fall back to recompute (nothing is lost: the outputs
  are the scheduler's).
- Takeover (a restarted scheduler, or a standby whose predecessor's lease lapsed): the block
  manager takes the replica's blocks, and every stored in-flight request is rebuilt with its
  outputs so far, detached, until its client re-attaches (`attach`) with the tokens it has
  already delivered. The longer of the two output lists wins: both are prefixes of what the
  old scheduler generated, so a client sees every token exactly once.
  The replica's CPU tables are freed with its device tables (`BlockPool.init`), so a sequence
  that was swapped out is recomputed like one that was running.
- A re-attach for a request the replica never heard of (it arrived after the last write)
  starts it from the client's tokens, as a continuation.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

from pagedserve.common.errors import InvalidArgument
from pagedserve.common.outputs import FinishReason, Usage
from pagedserve.common.params import SamplingParams
from pagedserve.scheduler.admission import check_admissible
from pagedserve.scheduler.block_manager import PoolSnapshot
from pagedserve.scheduler.block_pool import StoredRequest, _outputs_str
from pagedserve.scheduler.hashing import token_str
from pagedserve.scheduler.output import RequestStream
from pagedserve.scheduler.request import PROMPT_INDEX, Request, SequenceStatus

if TYPE_CHECKING:
    from pagedserve.scheduler.scheduler import Scheduler

log = logging.getLogger(__name__)

WAITING, FINISHED = SequenceStatus.WAITING, SequenceStatus.FINISHED


class ChoiceProgress(tuple):
    """(index, token ids the client has, whether the client saw it finish)."""

    __slots__ = ()

    def __new__(cls, index: int, token_ids: Seq[int], finished: bool = False) -> ChoiceProgress:
        return super().__new__(cls, (index, list(token_ids), finished))

    index = property(lambda self: self[0])
    token_ids = property(lambda self: self[1])
    finished = property(lambda self: self[2])


class RecoveryMixin:
    # --- executor pool lost --------------------------------------------------------------

    def reset_pool(self: Scheduler, epoch: str, *, executor_lost: bool = True) -> None:
        """Drop every block and recompute every running sequence with its outputs so far
        (their streams go on). With `executor_lost` False the executor still holds our
        sequences and is told to forget them. The replica gets the whole state next."""
        self.epoch = epoch
        self.blocks.reset()
        self.blocks.take_log()
        self.pending.clear()
        self.needs_full_write = True
        # A live executor may hold our sequences (and steps of them we never heard back about):
        # it drops everything at the next step. A new one holds nothing.
        self.forget_ids = []
        self.forget_all = not executor_lost
        self._restart_beams()
        for seq in self.running:
            seq.reset_for_recompute()
        self.waiting.extend_front([*self.running, *self._requeue_swapped()])
        self.running = []
        self.swap_out_pairs, self.swap_in_pairs = [], []
        if executor_lost:
            self.stats.executor_restarts += 1

    def forget_executor_state(self: Scheduler) -> None:
        """The executor may have lost track of our sequences (a step whose reply was lost, or
        one it refused). The steps planned since count tokens it may never have computed, so
        every running sequence starts over (mostly prefix-cache hits) and the executor is told
        to forget them."""
        self.reset_pool(self.epoch, executor_lost=False)

    # --- the replica ---------------------------------------------------------------------

    def stored_states(self: Scheduler) -> list[list]:
        """Every live sequence's state in the replica's SAVE form (for a whole write)."""
        out = []
        for request in [*self.requests.values(), *self.detached.values()]:
            for seq in request.seqs:
                f = self._state_fields(seq)
                out.append(
                    [
                        seq.seq_id,
                        token_str(f["prompt_token_ids"]),
                        f["params_json"],
                        f["priority"],
                        f["status"],
                        f["num_computed_tokens"],
                        _outputs_str(f["output_token_ids"]),
                    ]
                )
        return out

    def compare_with_replica(self: Scheduler, snap: PoolSnapshot, stored: list[StoredRequest]) -> list[str]:
        """Where the replica differs from this scheduler's own view (empty when equal); call it
        when every write has landed."""
        problems = [f"replica {d}" for d in self.blocks.snapshot().differences(snap)]
        mine = {}
        for request in [*self.requests.values(), *self.detached.values()]:
            for seq in request.seqs:
                mine[seq.seq_id] = (seq.output_token_ids, int(seq.status))
        theirs = {s.seq_id: (s.output_token_ids, s.status) for s in stored}
        for seq_id in sorted(set(mine) | set(theirs)):
            if mine.get(seq_id) != theirs.get(seq_id):
                problems.append(
                    f"request state {seq_id}: scheduler {mine.get(seq_id)} != replica {theirs.get(seq_id)}"
                )
        return problems

    # --- takeover --------------------------------------------------------------------------

    def take_over(self: Scheduler, snap: PoolSnapshot, stored: list[StoredRequest]) -> int:
        """Adopt the replica's blocks (tables already freed) and rebuild its in-flight requests,
        detached until their clients re-attach. Returns how many requests were rebuilt."""
        self.blocks.restore(snap)
        by_request: dict[str, list[StoredRequest]] = defaultdict(list)
        for s in stored:
            by_request[s.request_id].append(s)
        for request_id, states in by_request.items():
            first = states[0]
            request = self._new_request(request_id, first.prompt_token_ids, first.sampling, first.priority)
            if any(s.index == PROMPT_INDEX for s in states):
                request.seqs = request.initial_sequences()  # nothing sampled yet: start over
            elif first.sampling.use_beam_search:  # beams are not resumed: the search starts over
                request.seqs = request.initial_sequences()
                for s in states:
                    if s.seq_id != request.seqs[0].seq_id:
                        self.blocks.drop(s.seq_id)
            else:
                request.num_choices_left = first.sampling.n
                request.seqs = []
                known = {s.index: s for s in states}
                for index in range(first.sampling.n):
                    seq = request.choice(index)
                    s = known.get(index)
                    if s is not None:
                        seq.output_token_ids = list(s.output_token_ids)
                        if s.status == FINISHED:
                            seq.status, seq.finish_reason = FINISHED, FinishReason(s.finish_reason)
                            request.num_choices_left -= 1
                    request.seqs.append(seq)
                request.completion_tokens = sum(len(s.output_token_ids) for s in request.seqs)
            request.started = True  # its queue slot was counted by the previous scheduler
            self.detached[request_id] = request
        self.stats.num_resumed += len(by_request)
        return len(by_request)

    def attach(
        self: Scheduler,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        priority: int,
        progress: list[ChoiceProgress],
    ) -> RequestStream:
        """A client re-attaches to a request after a scheduler change, saying which tokens it
        already has per choice; the stream it gets carries only what the client has not seen."""
        if request_id in self.requests:
            raise InvalidArgument(f"request_id {request_id!r} is already attached", field="request_id")
        request = self.detached.pop(request_id, None)
        if request is None:  # the replica never heard of it: a continuation from the client's tokens
            check_admissible(self.limits, request_id, prompt_token_ids, sampling)
            self._check_new_id(request_id)
            request = self._new_request(request_id, list(prompt_token_ids), sampling, priority)
            request.seqs = request.initial_sequences()
        theirs = {p.index: p for p in progress}
        if request.seqs[0].index == PROMPT_INDEX and any(p.token_ids or p.finished for p in progress):
            request.num_choices_left = request.sampling.n  # the fork happened after the last write
            request.seqs = [request.choice(i) for i in range(request.sampling.n)]
        eos, max_len = self.limits.eos_token_ids, self.limits.max_model_len
        for seq in request.seqs:
            p = theirs.get(seq.index)
            if p is not None and len(p.token_ids) > len(seq.output_token_ids):
                seq.output_token_ids = list(p.token_ids)
            if seq.status == FINISHED:
                continue
            if p is not None and p.finished:  # a stop string the client's gateway applied
                seq.status, seq.finish_reason = FINISHED, FinishReason.STOP
                request.num_choices_left -= 1
            elif seq.output_token_ids and seq.check_stop(seq.output_token_ids[-1], eos, max_len):
                seq.status = FINISHED
                request.num_choices_left -= 1
        request.completion_tokens = sum(
            len(s.output_token_ids) for s in request.seqs if s.index != PROMPT_INDEX
        )
        for seq in request.seqs:  # what the client has not seen yet
            p = theirs.get(seq.index)
            if seq.index == PROMPT_INDEX or (p is not None and p.finished):
                continue
            seen = len(p.token_ids) if p is not None else 0
            reason = seq.finish_reason if seq.status == FINISHED else FinishReason.NONE
            if seq.output_token_ids[seen:] or reason != FinishReason.NONE:
                stop_id = (
                    seq.output_token_ids[-1] if reason == FinishReason.STOP and seq.output_token_ids else -1
                )
                request.stream.push(seq.index, seq.output_token_ids[seen:], None, reason, stop_id)
        self._enqueue(request)
        if request.started or any(s.output_token_ids for s in request.seqs):
            request.started = True
            self.num_queued -= 1  # resumed work does not count against the queue
        if request.num_choices_left <= 0:
            self._close(request)
        return request.stream

    def _close(self: Scheduler, request: Request) -> None:
        """Every choice is done (all finished before the takeover): drop it and end the stream."""
        for seq in request.seqs:
            if seq.status == WAITING:
                self.waiting.discard(seq)
                seq.status = FINISHED
            self.blocks.drop(seq.seq_id)
        self.requests.pop(request.request_id, None)
        request.stream.finish(Usage(len(request.prompt_token_ids), request.completion_tokens, 0))

    def _drop_detached(self: Scheduler, request: Request) -> None:
        for seq in request.seqs:
            self.blocks.drop(seq.seq_id)

    def expire_detached(self: Scheduler, request_ids: Seq[str]) -> None:
        """Resumed requests nobody re-attached to in time: drop them."""
        for request_id in request_ids:
            request = self.detached.pop(request_id, None)
            if request is not None:
                log.info("request %s was not re-attached in time; dropped", request_id)
                self._drop_detached(request)
