"""A step's results: sampled tokens appended, stops checked, prompts forked, requests finished.

Part of `Scheduler` (scheduler.py). Everything the replica must learn (progress, hash
registrations, frees, forks) goes into the block manager's log, which the engine ships with
the next step. A finished choice of an n > 1 request keeps its stored state (status FINISHED
with its reason) until the whole request ends, so that a scheduler taking over knows which
choices are done.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import TYPE_CHECKING

from pagedserve.common.outputs import FinishReason, Usage
from pagedserve.common.step import StepOutput
from pagedserve.scheduler.block_pool import status_field
from pagedserve.scheduler.request import BEAM_INDEX, PROMPT_INDEX, Sequence, SequenceStatus
from pagedserve.scheduler.swap import SWAPPED_FIELD

if TYPE_CHECKING:
    from pagedserve.scheduler.scheduler import ScheduledStep, Scheduler

log = logging.getLogger(__name__)

RUNNING = SequenceStatus.RUNNING
RUNNING_FIELD = str(int(RUNNING))


class CompletionMixin:
    def update(self: Scheduler, step: ScheduledStep, output: StepOutput) -> None:
        """Take one step's sampled tokens: append them, check stops, log the replica's writes."""
        ops = self.blocks.log
        sampled = {s.request_id: s for s in output.sampled}
        eos, max_len = self.limits.eos_token_ids, self.limits.max_model_len
        forked: dict[int, list[Sequence]] = {}  # id(seq) -> the sequences that replace it
        beam_outputs: dict[str, dict] = {}  # request id -> {beam id: candidates}
        bs = self.block_size
        unpublished = self.unpublished
        generated = 0
        if output.prompt_logprobs:
            # Whatever the sequence's status now (an n > 1 prompt sequence has forked by the time
            # its last chunk is back): the values are right, and repeats are dropped.
            by_id = {seq.seq_id: seq for seq, _ in step.seqs}
            for chunk in output.prompt_logprobs:
                seq = by_id.get(chunk.request_id)
                if seq is not None and not seq.request.aborted:
                    seq.request.add_prompt_logprobs(chunk.first_token_index, chunk.logprobs)
        for seq, _ in step.seqs:  # (their tokens were counted as computed when the step was planned)
            if seq.status != RUNNING:
                continue  # preempted, finished or aborted since: anything it sampled is dropped
            if seq.num_computed_tokens // bs > seq.num_registered_blocks:
                for index, block_hash, parent_hash, token_ids in seq.take_full_blocks(self.hasher):
                    self.blocks.register(seq.seq_id, index, block_hash, parent_hash, token_ids)
            if seq.index == BEAM_INDEX:
                self._take_beam_output(seq, sampled.get(seq.seq_id), beam_outputs)
                continue
            if seq.index == PROMPT_INDEX:
                if seq.num_computed_tokens >= seq.target_len:
                    forked[id(seq)] = self._fork_choices(seq)
                else:
                    ops.update(seq.seq_id, RUNNING_FIELD, seq.num_computed_tokens, ())
                continue
            token = sampled.get(seq.seq_id)
            if token is None:
                ops.update(seq.seq_id, RUNNING_FIELD, seq.num_computed_tokens, ())
                continue
            if not seq.num_pending:
                log.warning("executor sampled a token for %s that no step asked for", seq.seq_id)
                continue
            seq.num_pending -= 1
            token_id = token.token_id
            seq.output_token_ids.append(token_id)
            seq.request.completion_tokens += 1
            generated += 1
            if seq.check_stop(token_id, eos, max_len):
                self._push(seq, token_id, token.logprobs)
                self._finish(seq, token_id)
            else:  # to the client and the replica by publish(), while the next step runs
                unpublished.append((seq, token_id, token.logprobs, seq.num_computed_tokens))
        self.stats.generated_tokens += generated
        if beam_outputs:
            self._advance_beams(beam_outputs, forked)
        running: list[Sequence] = []
        live = slots = 0
        for seq in self.running:
            if forked and id(seq) in forked:
                running.extend(forked[id(seq)])
            elif seq.status == RUNNING:
                running.append(seq)
        for seq in running:
            live += seq.num_computed_tokens
            slots += len(seq.block_table)
        self.running = running
        self.stats.num_steps += 1
        self.stats.kv_utilization = live / (slots * bs) if slots else 0.0
        self.stats.live_tokens = live
        if len(self.pending):
            self.pending.settle()

    def publish(self: Scheduler) -> None:
        """Hand the last update's tokens to their streams and log their progress for the
        replica. The engine calls it once the next step is on its way to the executor, so it
        is off the step's critical path; a finishing token is pushed at once (with its finish)."""
        if not self.unpublished:
            return
        items, self.unpublished = self.unpublished, []
        ops = self.blocks.log
        for seq, token_id, logprobs, num_computed in items:
            seq.request.stream.push(seq.index, [token_id], None if logprobs is None else [logprobs])
            if seq.status == RUNNING:
                ops.update_token(seq.seq_id, RUNNING_FIELD, num_computed, token_id)
            elif seq.status == SequenceStatus.WAITING:  # preempted meanwhile: the token is kept
                ops.update(seq.seq_id, "1", 0, (token_id,))
            elif seq.status == SequenceStatus.SWAPPED:
                ops.update(seq.seq_id, SWAPPED_FIELD, seq.num_computed_tokens, (token_id,))

    def _push(self: Scheduler, seq: Sequence, token_id: int, logprobs) -> None:
        stop_id = token_id if seq.finish_reason == FinishReason.STOP else -1
        seq.request.stream.push(
            seq.index, [token_id], None if logprobs is None else [logprobs], seq.finish_reason, stop_id
        )

    def _fork_choices(self: Scheduler, parent: Sequence) -> list[Sequence]:
        """The prompt sequence is done: n choices share its blocks from here on."""
        request = parent.request
        children = request.fork_choices(parent)
        for child in children:
            self.blocks.fork(parent.seq_id, child.seq_id)
            self._save(child)
        parent.status = SequenceStatus.FINISHED
        parent.block_table = []
        self.blocks.drop(parent.seq_id)
        self._forget(parent)
        return children

    def _finish(self: Scheduler, seq: Sequence, last_token: int | None = None) -> None:
        """The sequence stopped (or was aborted): free its blocks, forget it; close the request
        when it was the last choice."""
        if seq.status == SequenceStatus.WAITING:
            self.waiting.discard(seq)
        elif seq.status == SequenceStatus.SWAPPED:
            self._discard_swapped(seq)
        seq.status = SequenceStatus.FINISHED
        seq.block_table = []
        self._forget(seq)
        request = seq.request
        request.num_choices_left -= 1
        if request.num_choices_left > 0:
            self.blocks.free(seq.seq_id)
            new = () if last_token is None else (last_token,)
            status = status_field(int(SequenceStatus.FINISHED), int(seq.finish_reason))
            self.blocks.log.update(seq.seq_id, status, seq.num_computed_tokens, new)
            return
        for s in request.seqs:
            self.blocks.drop(s.seq_id)
        self.requests.pop(request.request_id, None)
        if not request.started:
            self.num_queued -= 1
        cached = request.cached_prompt_tokens or 0
        request.stream.finish(Usage(len(request.prompt_token_ids), request.completion_tokens, cached))

    def _abort_now(self: Scheduler, request_id: str) -> None:
        self.publish()  # tokens made before the abort go out before it
        request = self.requests.get(request_id)
        if request is None:
            request = self.detached.pop(request_id, None)
            if request is not None:  # resumed, never re-attached: nobody is listening
                self._drop_detached(request)
            return
        if request.beam is not None:
            self._abort_beams(request)
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
            self._finish(seq)
        self.running = [s for s in self.running if s.status == RUNNING]

    def _save(self: Scheduler, seq: Sequence) -> None:
        """Log a sequence's whole state: what a scheduler taking over needs to continue it."""
        self.blocks.log.save(seq.seq_id, **self._state_fields(seq))

    def _state_fields(self: Scheduler, seq: Sequence) -> dict:
        request = seq.request
        params = {"rid": request.request_id, "i": seq.index, "s": dataclasses.asdict(request.sampling)}
        return {
            "prompt_token_ids": request.prompt_token_ids,
            "params_json": json.dumps(params, separators=(",", ":")),
            "priority": request.priority,
            "status": status_field(int(seq.status), int(seq.finish_reason)),
            "num_computed_tokens": seq.num_computed_tokens,
            "output_token_ids": seq.output_token_ids,
        }
