"""Preemption by swap or by recompute, of whole groups, and resuming swapped groups.

Part of `Scheduler` (scheduler.py). When blocks run out, the newest running sequence's *group*
(the running sequences of its request: the n choices of a parallel-sampling request share
blocks, so preempting one alone frees little) is preempted, one of two ways:
- **recompute**: its blocks are freed and it goes back to the front of the waiting queue; it
  recomputes its prompt and outputs (mostly prefix-cache hits) when admitted again;
- **swap**: the KV of its computed tokens moves to CPU blocks (one per distinct device block,
  so shared blocks stay shared: `BlockManager.swap_out`), the device blocks are freed, and the
  group waits in `swapped`. Swapped groups are swapped back in before any new admission, first
  come first served (priority, then arrival), when the blocks for them and one more block per
  sequence are free (so that they do not bounce straight back out).

`--preemption-mode`: `recompute`, `swap`, or `auto` (the default), which swaps the groups that
cannot recompute cheaply — parallel sampling (n > 1), anything a further predicate names (beam
search plugs in here), and sequences with at least `swap_min_tokens` computed tokens — and
recomputes the rest. Any mode falls back to recompute when the CPU blocks are short (or the
executor has none).

A swap-out never shares a step with a swap-in (the executor runs swap-outs first, so a CPU block
freed by a swap-in and reused by a swap-out would be overwritten before it is read): groups are
resumed only in steps that preempted nothing, like admissions. A token in flight for a swapped
sequence is dropped, and the sequence resumes one token short of its known tokens, so that it
recomputes its last token and samples again (seeds are per token index: the same token).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from pagedserve.common.sizes import cdiv
from pagedserve.scheduler.request import BEAM_INDEX, Sequence, SequenceStatus

if TYPE_CHECKING:
    from pagedserve.scheduler.scheduler import Scheduler

RUNNING, SWAPPED, WAITING = SequenceStatus.RUNNING, SequenceStatus.SWAPPED, SequenceStatus.WAITING
SWAPPED_FIELD = str(int(SWAPPED))
DEFAULT_SWAP_MIN_TOKENS = 1024


class PreemptionMode(StrEnum):
    AUTO = "auto"
    RECOMPUTE = "recompute"
    SWAP = "swap"


GroupPredicate = Callable[[list[Sequence]], bool]


def is_parallel_sampling(group: list[Sequence]) -> bool:
    """n > 1: the choices share prompt blocks that a recompute would compute again for each."""
    return group[0].request.sampling.n > 1


@dataclass(frozen=True, slots=True)
class PreemptionPolicy:
    mode: PreemptionMode = PreemptionMode.AUTO
    swap_min_tokens: int = DEFAULT_SWAP_MIN_TOKENS  # auto: swap a sequence with this many computed tokens
    # auto: groups that swap whatever their length (beam search adds its own)
    swap_groups: tuple[GroupPredicate, ...] = field(default=(is_parallel_sampling,))

    def prefers_swap(self, group: list[Sequence]) -> bool:
        if group[0].index == BEAM_INDEX:
            return False  # a preempted beam search starts again from its prompt (beam_steps.py)
        if self.mode == PreemptionMode.RECOMPUTE:
            return False
        if self.mode == PreemptionMode.SWAP:
            return True
        if any(s.num_computed_tokens >= self.swap_min_tokens for s in group):
            return True
        return any(predicate(group) for predicate in self.swap_groups)


class SwapMixin:
    def _init_swap(self: Scheduler) -> None:
        self.swapped: list[list[Sequence]] = []  # swapped-out groups
        self.swap_out_pairs: list[tuple[int, int]] = []  # (device, cpu) for the step being planned
        self.swap_in_pairs: list[tuple[int, int]] = []  # (cpu, device)

    @property
    def num_swapped_seqs(self: Scheduler) -> int:
        """Sequences swapped out (they count as waiting in Stats and the pool's load)."""
        return sum(len(group) for group in self.swapped)

    @property
    def num_swapped_blocks(self: Scheduler) -> int:
        """CPU blocks holding swapped-out KV."""
        return len(self.blocks.cpu_ref)

    def _preempt_group(
        self: Scheduler, victim: Sequence, growing: Sequence, planned: list, copies: list[tuple[int, int]]
    ) -> tuple[list[Sequence], int]:
        """Preempt the running sequences of `victim`'s request, by swap when the policy says so
        and the CPU blocks are there, else by recompute, so that `growing` gets its blocks.
        Members already planned in this step are taken out of `planned` (with their
        copy-on-writes). Returns (the preempted sequences, the token budget given back).

        When the victim is a sibling of `growing` (its own group is the newest), preempting the
        whole group would not let it grow (and a group that fills the pool alone, e.g. choices
        that lost their sharing to an executor restart, would swap out and in forever): only the
        victim is preempted, by recompute."""
        if victim.request is growing.request:
            self._preempt(victim)
            return [victim], 0
        group = [s for s in self.running if s.request is victim.request]
        members = {id(s) for s in group}
        refund = 0
        for k in reversed(range(len(planned))):
            if id(planned[k][0]) in members:
                refund += planned[k][1]
                del planned[k]
        blocks = {b for s in group for b in s.block_table}
        # A copy-on-write planned in this step has not happened yet: its destination holds
        # nothing, its source the KV (a swap-out reads the source instead).
        copied_from = {dst: src for src, dst in copies if dst in blocks}
        if copied_from:
            copies[:] = [(src, dst) for src, dst in copies if dst not in copied_from]
        if not (self.policy.prefers_swap(group) and self._swap_out(group, copied_from)):
            for seq in reversed(group):
                self._preempt(seq)
                if seq.index == BEAM_INDEX:
                    break  # that preempted all of its beams
        return group, refund

    def _swap_out(self: Scheduler, group: list[Sequence], copied_from: dict[int, int]) -> bool:
        bs = self.block_size
        # What stays computed: a token in flight is dropped, and the last known token is computed
        # again on resume so that the sequence samples (the prompt sequence of an n > 1 request
        # forks when it reaches its target, so it too stops one short).
        computed = [min(s.num_computed_tokens, s.target_len - s.num_pending - 1) for s in group]
        computed = [max(c, 0) for c in computed]
        pairs = self.blocks.swap_out([s.seq_id for s in group], [cdiv(c, bs) for c in computed])
        if pairs is None:
            return False
        self.swap_out_pairs.extend((copied_from.get(gpu, gpu), cpu) for gpu, cpu in pairs)
        for seq, c in zip(group, computed, strict=True):
            self.running.remove(seq)
            self._forget(seq)
            seq.block_table = []
            seq.num_computed_tokens = c
            seq.num_pending = 0
            seq.status = SWAPPED
            self.blocks.log.update(seq.seq_id, SWAPPED_FIELD, c, ())
        self.swapped.append(group)
        self.stats.num_preemptions += len(group)
        self.stats.swap_out_blocks += len(pairs)
        return True

    def _resume_swapped(self: Scheduler, planned: list, copies: list[tuple[int, int]], budget: int) -> int:
        """Swap groups back in, first come first served, while their blocks (plus one per
        sequence of headroom, unless nothing else runs), the sequence cap and the token budget
        allow; their tokens join the step. Returns the budget left."""
        while self.swapped and budget > 0:
            group = min(self.swapped, key=lambda g: (g[0].request.priority, g[0].request.arrival))
            if len(self.running) + len(group) > self.limits.max_num_seqs:
                break
            need = self.blocks.num_distinct_blocks([self.blocks.cpu_tables.get(s.seq_id, []) for s in group])
            if self.running:
                need += len(group)
            if need > self.blocks.num_available:
                break
            pairs = self.blocks.swap_in([s.seq_id for s in group])
            if pairs is None:
                break
            self.swapped.remove(group)
            self.swap_in_pairs.extend(pairs)
            self.stats.swap_in_blocks += len(pairs)
            for seq in group:
                seq.block_table = list(self.blocks.tables.get(seq.seq_id, []))
                seq.status = RUNNING
                self.running.append(seq)
            for seq in group:
                num_tokens = min(seq.target_len - seq.num_computed_tokens, budget)
                if num_tokens <= 0 or len(planned) >= self.limits.max_num_seqs:
                    continue
                new_ids = self._grow(seq, num_tokens, copies)
                if new_ids is None:
                    break  # it runs from the next step on, like any running sequence
                planned.append((seq, num_tokens, new_ids))
                budget -= num_tokens
        return budget

    def _take_swaps(self: Scheduler) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        out, into = self.swap_out_pairs, self.swap_in_pairs
        assert not (out and into), "a swap-out and a swap-in in one step"
        self.swap_out_pairs, self.swap_in_pairs = [], []
        return out, into

    def _discard_swapped(self: Scheduler, seq: Sequence) -> None:
        """A swapped sequence ends (aborted): it leaves its group; its CPU blocks are freed by
        the caller's free or drop."""
        for group in self.swapped:
            if seq in group:
                group.remove(seq)
                if not group:
                    self.swapped.remove(group)
                return

    def _requeue_swapped(self: Scheduler) -> list[Sequence]:
        """Every swapped sequence back to waiting for recompute (its CPU blocks are gone with the
        pool, or not to be trusted). Returns them, oldest group first."""
        seqs = [s for group in sorted(self.swapped, key=lambda g: g[0].request.arrival) for s in group]
        self.swapped = []
        for seq in seqs:
            seq.reset_for_recompute()
        return seqs
