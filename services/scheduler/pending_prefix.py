"""Prefix blocks that a planned step computes, shared before they reach the prefix cache.

A block enters the prefix cache (`BlockManager.register`) when the step that computes it has come
back. Until then a request with the same prefix would miss and compute it again: when many
requests with one system prompt arrive at once, every one admitted in the first step, and (with
the next step planned while one runs) in the second, recomputes the whole prompt.

The executor runs steps in order, and within a step it writes every token's K/V of a layer before
any of that layer's attention reads the pool. So a block that a planned step fills (the step that
computes it, or an earlier one) can be read by a sequence of the same step or any later one. Such
prompt blocks are noted here, by the chained hash they will be registered under; an admission that runs
out of cache hits goes on through them, sharing them explicitly (the ADMIT op names the blocks, so
the Redis replica never holds a hash for a block that is not computed yet: a scheduler that dies
before the step runs leaves no false cache entry behind).

A note holds while its owner is running with the same table (the list object: a preempted
sequence gets a new one when it is admitted again) and the block is still at its index there; a
step that fails resets the pool, and every note with it (`clear`).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING, NamedTuple

from pagedserve.scheduler.block_manager import confirmed_run
from pagedserve.scheduler.hashing import ROOT_HASH, BlockHasher, token_str
from pagedserve.scheduler.request import SequenceStatus

if TYPE_CHECKING:
    from pagedserve.scheduler.request import Sequence


class _Note(NamedTuple):
    owner: Sequence
    table: list[int]  # the owner's block table when noted (identity is checked)
    index: int
    block: int
    parent_hash: str
    tokens: str


class PendingBlocks:
    def __init__(self, hasher: BlockHasher) -> None:
        self.hasher = hasher
        self._notes: dict[str, _Note] = {}  # chained block hash -> note

    def __len__(self) -> int:
        return len(self._notes)

    def clear(self) -> None:
        self._notes.clear()

    def note(self, seq: Sequence, computed_after: int) -> None:
        """The sequence's prompt blocks that are full once `computed_after` of its tokens are
        computed (past the registered ones) are being computed. Only prompt blocks: what requests
        sent together share is their prompts, and a decode step returns at once."""
        bs = self.hasher.block_size
        full = min(computed_after, len(seq.request.prompt_token_ids)) // bs
        start = seq.num_registered_blocks
        if full <= start or full > len(seq.block_table):
            return
        hashes = seq.block_hashes
        if len(hashes) < full:
            self.hasher.extend(hashes, seq.token_ids(len(hashes) * bs, full * bs))
        table = seq.block_table
        for j in range(start, full):
            if hashes[j] not in self._notes:
                tokens = token_str(seq.token_ids(j * bs, (j + 1) * bs))
                self._notes[hashes[j]] = _Note(
                    seq, table, j, table[j], hashes[j - 1] if j else ROOT_HASH, tokens
                )

    def run(self, chain: Seq[tuple[str, str]], start: int) -> list[int]:
        """The blocks that continue `chain` (hash, token_str) from index `start` (where the cache
        hits ended), each confirmed against its tokens and parent hash like a cache hit."""
        return confirmed_run(chain[start:], self._holding, chain[start - 1][0] if start else ROOT_HASH)

    def _holding(self, block_hash: str) -> _Note | None:
        """The note under this hash if it still holds; one that does not is dropped."""
        note = self._notes.get(block_hash)
        if note is not None and not self._holds(note):
            del self._notes[block_hash]
            return None
        return note

    def settle(self) -> None:
        """After a step came back: drop the notes whose blocks are in the cache now (registered by
        their owner) and those that no longer hold (preempted, finished or aborted owners)."""
        stale = [
            h for h, note in self._notes.items()
            if note.index < note.owner.num_registered_blocks or not self._holds(note)
        ]  # fmt: skip
        for block_hash in stale:
            del self._notes[block_hash]

    @staticmethod
    def _holds(note: _Note) -> bool:
        owner = note.owner
        return (
            owner.status == SequenceStatus.RUNNING
            and owner.block_table is note.table
            and note.index < len(note.table)
            and note.table[note.index] == note.block
        )
