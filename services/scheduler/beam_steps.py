"""Beam search in the scheduler: a request's beams share blocks and move in lockstep.

Part of `Scheduler` (scheduler.py). The selection rule is beam.py's; this module runs it on
sequences and blocks:
- One sequence computes the prompt (chunked, prefix-cache hits, like any other); when it
  samples, the executor returns its best `num_candidates` next tokens.
- Every later step, each running beam computes its one new token and returns candidates; the
  step's output holds all of a request's beams, and `BeamSearch.advance` picks the next beams
  from them at once. Each next beam is a new sequence forked from its parent (ref counts up,
  nothing copied); then every parent is dropped, so a pruned beam's blocks go at once. A
  shared partial last block is copied on write when the beams grow (`_grow`), all but the
  last sharer copying.
- A beam's next token is only known once its step's output is in, so its sequences are
  never planned ahead: while a step with a request's beams is in flight they have nothing
  to compute (`Sequence.target_len`), and its next beams are planned the step after.
- All beams of a request run in the same step, or none does; when blocks run out and a beam
  is the victim, the whole request is preempted and its search starts over from the prompt
  (mostly prefix-cache hits). The same after the executor's pool is lost, or when another
  scheduler takes the request over from Redis: the per-beam state is not kept, and the
  search, being deterministic, gives the same answer again.
- Each new beam reaches the executor as a new request that forks its parent's state there
  (`NewRequestData.fork_of`: the parent's tokens up to the shared KV, then the new token),
  so a step sends O(1) per beam, never the prompt again; the parents are forgotten in the
  same step. A beam whose parent is gone from the executor is sent whole.
- The client gets nothing until the search is done, then the `width` best hypotheses as
  choices 0..width-1, best first, each with its cumulative log-probability and score.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pagedserve.common.errors import PagedServeError
from pagedserve.common.outputs import FinishReason, Usage
from pagedserve.common.sizes import cdiv
from pagedserve.common.step import NewRequestData
from pagedserve.scheduler.beam import num_candidates
from pagedserve.scheduler.request import BEAM_INDEX, Request, Sequence, SequenceStatus

if TYPE_CHECKING:
    from pagedserve.scheduler.scheduler import Scheduler

log = logging.getLogger(__name__)

RUNNING, WAITING, FINISHED = SequenceStatus.RUNNING, SequenceStatus.WAITING, SequenceStatus.FINISHED


class BeamMixin:
    def _num_beam_candidates(self: Scheduler, seq: Sequence) -> int:
        if seq.index != BEAM_INDEX:
            return 0
        params = seq.request.sampling
        return num_candidates(params.n, len(self._beam_eos(seq.request)))

    def _beam_fork_data(self: Scheduler, seq: Sequence, num_tokens: int) -> NewRequestData | None:
        """A new beam whose parent the executor still holds (its forget goes in this same
        step) is sent as a fork of it: its new token only, not its whole prompt and outputs."""
        if not seq.fork_parent or seq.fork_parent not in self.forget_ids:
            return None
        return NewRequestData(
            seq.seq_id,
            [],
            seq.token_ids(seq.num_computed_tokens, seq.num_tokens),
            seq.sampling,
            list(seq.block_table),
            seq.num_computed_tokens,
            num_tokens,
            self._num_beam_candidates(seq),
            seq.fork_parent,
        )

    def _beam_eos(self: Scheduler, request: Request) -> frozenset[int]:
        return frozenset() if request.sampling.ignore_eos else self.limits.eos_token_ids

    # --- planning --------------------------------------------------------------------------

    def _plan_beams(
        self: Scheduler, i: int, planned: list, copies: list[tuple[int, int]], budget: int
    ) -> tuple[int, int, bool]:
        """Plan one token for every beam of the request at running[i] (its beams sit there
        together), or none of them. Returns (next index, budget left, whether it preempted)."""
        running = self.running
        request = running[i].request
        group = request.seqs
        n = len(group)
        waiting_for_output = any(s.target_len <= s.num_computed_tokens for s in group)
        if waiting_for_output or budget < n or len(planned) + n > self.limits.max_num_seqs:
            return i + n, budget, False
        preempted = False
        while self._beam_blocks_needed(group) > self.blocks.num_available:
            victim = running[-1]
            self._preempt(victim)
            preempted = True
            if victim.request is request:
                return i, budget, True  # it was the newest: running[i] is now whatever follows
        for seq in group:
            new_ids = self._grow(seq, 1, copies)
            assert new_ids is not None, "grow after a check that the blocks are there"
            planned.append((seq, 1, new_ids))
        return i + n, budget - n, preempted

    def _beam_blocks_needed(self: Scheduler, group: list[Sequence]) -> int:
        """Blocks `_grow` takes for one more token in each beam: fresh blocks past the table's
        end, and a copy of a shared partial last block for each sharer but the last to copy."""
        bs = self.block_size
        needed = 0
        sharers: dict[int, int] = {}
        for seq in group:
            computed, table = seq.num_computed_tokens, seq.block_table
            needed += max(cdiv(computed + 1, bs) - len(table), 0)
            if computed % bs and table and self.blocks.ref_cnt(table[-1]) > 1:
                sharers[table[-1]] = sharers.get(table[-1], 0) + 1
        for block, count in sharers.items():  # after count - 1 copies the last sharer holds it alone
            needed += count - 1 if self.blocks.ref_cnt(block) == count else count
        return needed

    def _preempt_beams(self: Scheduler, request: Request) -> None:
        """Drop every beam (blocks and stored state) and queue the search again from its prompt."""
        for seq in request.seqs:
            if seq.status == WAITING:
                self.waiting.discard(seq)
            seq.status = FINISHED
            seq.block_table = []
            self.blocks.drop(seq.seq_id)
            self._forget(seq)
        self.running[:] = [s for s in self.running if s.request is not request]
        request.seqs = request.initial_sequences()
        root = request.seqs[0]
        self._save(root)
        self.waiting.push_front(root)
        self.stats.num_preemptions += 1

    # --- a step's output -------------------------------------------------------------------

    def _take_beam_output(self: Scheduler, seq: Sequence, token, outputs: dict) -> None:
        """Keep a beam's candidates until all of its request's beams are in (see update)."""
        if token is None:  # a chunk in the middle of the prompt
            self.blocks.log.update(seq.seq_id, str(int(RUNNING)), seq.num_computed_tokens, ())
            return
        outputs.setdefault(seq.request.request_id, {})[seq.seq_id] = token.beam_candidates

    def _advance_beams(
        self: Scheduler, outputs: dict[str, dict], replaced: dict[int, list[Sequence]]
    ) -> None:
        """Pick each request's next beams from all of its beams' candidates; `replaced` maps
        id(old beam) -> the sequences that take its place in `running`."""
        for request_id, candidates in outputs.items():
            request = self.requests.get(request_id)
            beams = request.seqs if request is not None else []
            if request is None or request.beam is None or any(b.seq_id not in candidates for b in beams):
                log.warning("beam request %s: a step's output lacks some of its beams", request_id)
                continue
            params = request.sampling
            max_new = min(params.max_tokens, self.limits.max_model_len - len(request.prompt_token_ids))
            try:
                chosen = request.beam.advance(
                    [b.cumulative_logprob for b in beams],
                    [b.output_token_ids for b in beams],
                    [candidates[b.seq_id] for b in beams],
                    self._beam_eos(request),
                    max_new,
                )
            except Exception as err:  # this request fails (its blocks freed next step), not the step
                log.exception("beam request %s: its search failed", request_id)
                request.stream.fail(PagedServeError(f"beam search failed: {type(err).__name__}: {err}"))
                self.abort(request_id)
                continue
            self.stats.generated_tokens += len(beams)
            children = []
            for parent_index, token_id, total in chosen:
                parent = beams[parent_index]
                child = request.beam_sequence(parent, token_id)
                child.cumulative_logprob = total
                self.blocks.fork(parent.seq_id, child.seq_id)
                self._save(child)
                children.append(child)
            for beam in beams:  # after the forks, so that shared blocks stay
                beam.status = FINISHED
                beam.block_table = []
                self.blocks.drop(beam.seq_id)
                self._forget(beam)
                replaced[id(beam)] = []
            replaced[id(beams[0])] = children
            request.seqs = children
            if request.beam.done:
                self._finish_beams(request)

    def _finish_beams(self: Scheduler, request: Request) -> None:
        """The search is done: the kept hypotheses go out as the request's choices, best first."""
        eos = self._beam_eos(request)
        hypotheses = request.beam.finished[: request.sampling.n]
        for index, hyp in enumerate(hypotheses):
            stopped = bool(hyp.token_ids) and hyp.token_ids[-1] in eos
            request.stream.push_beam(
                index,
                hyp.token_ids,
                FinishReason.STOP if stopped else FinishReason.LENGTH,
                hyp.token_ids[-1] if stopped else -1,
                hyp.cumulative_logprob,
                hyp.score,
            )
        for index in range(len(hypotheses), request.sampling.n):  # (never with a real vocabulary)
            request.stream.push(index, [], None, FinishReason.LENGTH)
        request.completion_tokens = sum(len(h.token_ids) for h in hypotheses)
        self._end_beam_request(request)

    def _abort_beams(self: Scheduler, request: Request) -> None:
        for index in range(request.sampling.n):
            request.stream.push(index, [], None, FinishReason.ABORT)
        for seq in request.seqs:
            if seq.status == WAITING:
                self.waiting.discard(seq)
            seq.status = FINISHED
            seq.finish_reason = FinishReason.ABORT
            seq.block_table = []
            self.blocks.drop(seq.seq_id)
            self._forget(seq)
        self.running[:] = [s for s in self.running if s.request is not request]
        request.seqs = []
        self._end_beam_request(request)

    def _end_beam_request(self: Scheduler, request: Request) -> None:
        request.num_choices_left = 0
        self.requests.pop(request.request_id, None)
        if not request.started:
            self.num_queued -= 1
        cached = request.cached_prompt_tokens or 0
        request.stream.finish(Usage(len(request.prompt_token_ids), request.completion_tokens, cached))

    # --- recovery --------------------------------------------------------------------------

    def _restart_beams(self: Scheduler) -> None:
        """After the pool was reset: each beam request with running beams starts over from
        its prompt (its blocks are gone; a waiting prompt beam needs nothing)."""
        restarted: dict[str, Request] = {}
        kept = []
        for seq in self.running:
            if seq.index == BEAM_INDEX:
                restarted[seq.request.request_id] = seq.request
            else:
                kept.append(seq)
        self.running[:] = kept
        for request in restarted.values():
            for seq in request.seqs:
                seq.status = FINISHED
            request.seqs = request.initial_sequences()
            self.waiting.push_front(request.seqs[0])
