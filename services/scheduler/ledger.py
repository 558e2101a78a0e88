"""The scheduler's local view of its pool, for planning a step before the pool answers.

`ref_cnt` mirrors the pool's ref counts exactly: the scheduler is the pool's only writer and
changes a count exactly when it changes a block table (a free lowers it at once; blocks the
pool hands out raise it when the step's reply names them). `num_available` (free + cached
blocks an allocation may take) is the pool's own figure after each step, raised by frees
planned since and lowered, conservatively, by the blocks each planned allocation may take.
"""

from __future__ import annotations


class BlockLedger:
    __slots__ = ("ref_cnt", "num_available")

    def __init__(self, num_blocks: int) -> None:
        self.ref_cnt: dict[int, int] = {}  # block -> ref_cnt, only counts > 0
        self.num_available = num_blocks

    def reset(self, num_blocks: int) -> None:
        self.ref_cnt.clear()
        self.num_available = num_blocks

    def ref_up(self, blocks: list[int]) -> None:
        """References the pool already granted (its reply's counts include them)."""
        ref = self.ref_cnt
        for b in blocks:
            ref[b] = ref.get(b, 0) + 1

    def ref_down(self, block: int) -> None:
        """A reference dropped by an operation queued for the next step; a block left with
        none becomes available to that step's allocations (they run after the free)."""
        left = self.ref_cnt[block] - 1
        if left:
            self.ref_cnt[block] = left
        else:
            del self.ref_cnt[block]
            self.num_available += 1

    def release(self, table: list[int]) -> None:
        for block in table:
            self.ref_down(block)
