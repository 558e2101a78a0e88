"""The block manager: one executor pool's KV block accounting, in process and authoritative.

While a scheduler holds its pool's lease, this object decides every block id: planning asks
it and gets real answers at once (`allocate` returns the ids or None), the way nano-vllm's
block manager does. Every change it makes is also appended to `log`, a `StepOps` in the op
language of `block_pool.py`; the engine ships each step's log to the durable replica (Redis)
in one script call, concurrently with the executor call. The replica interprets the same
ops with the same data layout, so it arrives at the same state: same ids, same LRU order.

Invariants (`check()`): every block is exactly one of free (on the free list, no hash), used
(ref_cnt > 0) or cached-evictable (ref_cnt == 0, a hash, in the LRU); a block's ref_cnt equals
the number of block-table entries pointing at it; free + used + cached == num_blocks; the
hash map and each block's hash agree one to one. CPU blocks (swap space) are either free or
used by swapped-out sequences' CPU tables (swap_blocks.py). Operations that can run out of blocks check
first and change nothing when the blocks are not there (None: backpressure is a value).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from pagedserve.common.sizes import cdiv
from pagedserve.scheduler.block_pool import (
    ALLOC,
    COW,
    DROP,
    FORK,
    FREE,
    REG,
    Admission,
    BlockCopy,
    PoolCounts,
    StepOps,
)
from pagedserve.scheduler.hashing import ROOT_HASH, token_str
from pagedserve.scheduler.swap_blocks import SwapBlocksMixin


class HashEntry(NamedTuple):
    block: int
    parent_hash: str
    tokens: str  # token_str of the block's token ids, to confirm a hit


class BlockEntry(Protocol):
    """A block found under a chained hash: a cache entry, or a block a planned step computes."""

    @property
    def block(self) -> int: ...
    @property
    def parent_hash(self) -> str: ...
    @property
    def tokens(self) -> str: ...


def confirmed_run(
    chain: Sequence[tuple[str, str]], lookup: Callable[[str], BlockEntry | None], parent: str = ROOT_HASH
) -> list[int]:
    """The blocks of the longest leading run of `chain` ((hash, token_str) pairs, the first one's
    parent `parent`) that `lookup` finds, each confirmed against its stored parent hash and
    tokens, and none twice: what counts as a prefix hit."""
    blocks: list[int] = []
    for block_hash, tokens in chain:
        entry = lookup(block_hash)
        if entry is None or entry.parent_hash != parent or entry.tokens != tokens or entry.block in blocks:
            break
        blocks.append(entry.block)
        parent = block_hash
    return blocks


@dataclass(slots=True)
class PoolSnapshot:
    """A whole pool's block accounting, as the replica stores it (for restore and comparison)."""

    num_blocks: int
    block_size: int
    free_list: list[int] = field(default_factory=list)  # head first
    ref: dict[int, int] = field(default_factory=dict)
    lru: list[int] = field(default_factory=list)  # oldest first
    hash_map: dict[str, HashEntry] = field(default_factory=dict)
    tables: dict[str, list[int]] = field(default_factory=dict)
    tick: int = 0  # the LRU clock
    num_cpu_blocks: int = 0
    cpu_free_list: list[int] = field(default_factory=list)  # head first
    cpu_ref: dict[int, int] = field(default_factory=dict)
    cpu_tables: dict[str, list[int]] = field(default_factory=dict)

    def digest(self) -> str:
        """A short digest of the accounting (not the LRU clock), equal for equal pools."""
        body = json.dumps(
            [
                self.num_blocks,
                self.block_size,
                self.free_list,
                sorted(self.ref.items()),
                self.lru,
                sorted((h, list(e)) for h, e in self.hash_map.items()),
                sorted(self.tables.items()),
                self.num_cpu_blocks,
                self.cpu_free_list,
                sorted(self.cpu_ref.items()),
                sorted(self.cpu_tables.items()),
            ],
            separators=(",", ":"),
        )
        return hashlib.blake2b(body.encode(), digest_size=12).hexdigest()

    def differences(self, other: PoolSnapshot) -> list[str]:
        """What differs from `other`, one line per part (empty when equal)."""
        out = []
        for name in (
            "num_blocks",
            "block_size",
            "free_list",
            "ref",
            "lru",
            "hash_map",
            "tables",
            "num_cpu_blocks",
            "cpu_free_list",
            "cpu_ref",
            "cpu_tables",
        ):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                out.append(f"{name}: {_describe(mine)} != {_describe(theirs)}")
        return out


def _describe(value) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


class BlockManager(SwapBlocksMixin):
    def __init__(self, num_blocks: int, block_size: int, num_cpu_blocks: int = 0) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_cpu_blocks = num_cpu_blocks
        self.log = StepOps()  # changes not yet shipped to the replica
        self.reset()

    def reset(self) -> None:
        """Every block free (GPU and CPU), no table, no cached hash (the log is left alone)."""
        self.free_list: deque[int] = deque(range(self.num_blocks))
        self.ref: dict[int, int] = {}
        self.lru: OrderedDict[int, int] = OrderedDict()  # block -> tick released, oldest first
        self.hash_map: dict[str, HashEntry] = {}
        self.block_hash: dict[int, str] = {}
        self.tables: dict[str, list[int]] = {}
        self.tick = 0
        self.reset_cpu()

    def take_log(self) -> StepOps:
        log, self.log = self.log, StepOps()
        return log

    # --- queries -------------------------------------------------------------------------

    @property
    def num_available(self) -> int:
        """Blocks an allocation may take: free ones first, then evicted cached ones."""
        return len(self.free_list) + len(self.lru)

    def counts(self) -> PoolCounts:
        return PoolCounts(len(self.free_list), len(self.lru), len(self.ref))

    def ref_cnt(self, block: int) -> int:
        return self.ref.get(block, 0)

    # --- changes -------------------------------------------------------------------------

    def free(self, rid: str) -> None:
        """Drop the table, last block first (so its tail is evicted first)."""
        if rid in self.tables or rid in self.cpu_tables:
            self._free(rid)
            self.log.ops.append([FREE, rid])

    def drop(self, rid: str) -> None:
        """Free the table and forget the request's stored state."""
        self._free(rid)
        self.log.ops.append([DROP, rid])

    def allocate(self, rid: str, num_blocks: int) -> list[int] | None:
        """Append `num_blocks` fresh blocks to the table; None (nothing changed) when short."""
        if num_blocks > self.num_available:
            return None
        new = [self._take() for _ in range(num_blocks)]
        if new:
            self.tables.setdefault(rid, []).extend(new)
            self.log.ops.append([ALLOC, rid, num_blocks])
        return new

    def cached_prefix(self, chain: Sequence[tuple[str, str]]) -> int:
        """How many leading blocks of `chain` `admit` would find in the cache (changes nothing)."""
        return len(confirmed_run(chain, self.hash_map.get))

    def admit(
        self,
        rid: str,
        chain: Sequence[tuple[str, str]],
        num_tokens: int,
        num_new_tokens: int,
        shared: Sequence[int] = (),
    ) -> Admission | None:
        """A table for a request that has none: the longest run of `chain` (hash, token_str)
        found in the cache, each hit confirmed against its stored tokens and parent hash, then
        the `shared` blocks (held by other tables, each takes one more reference: blocks a
        planned step computes, see pending_prefix.py), then fresh blocks to cover
        min(num_tokens, hit and shared tokens + num_new_tokens). None when short, or when a
        shared block is not in use or is among the hits."""
        if self.tables.get(rid):
            return None
        hits = confirmed_run(chain, self.hash_map.get)
        if any(block not in self.ref or block in hits for block in shared) or len(set(shared)) < len(shared):
            return None
        num_from_lru = sum(block not in self.ref for block in hits)
        hits += shared
        bs = self.block_size
        covered = min(num_tokens, len(hits) * bs + num_new_tokens)
        num_fresh = max(cdiv(covered, bs) - len(hits), 0)
        if num_fresh + num_from_lru > self.num_available:
            return None
        for block in hits:
            if block in self.ref:
                self.ref[block] += 1
            else:
                del self.lru[block]
                self.ref[block] = 1
        table = hits + [self._take() for _ in range(num_fresh)]
        if table:
            self.tables[rid] = table
        self.log.admit(rid, chain, num_tokens, num_new_tokens, shared)
        return Admission(True, len(hits), list(table))

    def fork(self, parent: str, child: str) -> list[int]:
        """The child shares the parent's whole table (each ref_cnt up); its table is returned."""
        table = self.tables.get(parent, [])
        if not table or parent == child or self.tables.get(child):
            return list(self.tables.get(child, []))
        for block in table:
            self.ref[block] += 1
        self.tables[child] = list(table)
        self.log.ops.append([FORK, parent, child])
        return list(table)

    def cow(self, rid: str) -> BlockCopy | None:
        """Copy-on-write of the last block when another table shares it: the request gets a
        fresh block in its place; (src, dst) says what the executor copies. src == -1: the
        block was not shared. None when no block is available."""
        table = self.tables.get(rid)
        if not table or self.ref[table[-1]] <= 1:
            return BlockCopy(True, -1, -1)
        if not self.num_available:
            return None
        src = table[-1]
        dst = self._take()
        self.ref[src] -= 1
        table[-1] = dst
        self.log.ops.append([COW, rid])
        return BlockCopy(True, src, dst)

    def register(
        self, rid: str, index: int, block_hash: str, parent_hash: str, token_ids: Sequence[int]
    ) -> None:
        """Cache a block that became full under its chained hash (a block that has a hash, or a
        hash some block holds, is left as it is)."""
        table = self.tables.get(rid, [])
        if not 0 <= index < len(table):
            return
        block = table[index]
        if block in self.block_hash or block_hash in self.hash_map:
            return
        tokens = token_str(token_ids)
        self.hash_map[block_hash] = HashEntry(block, parent_hash, tokens)
        self.block_hash[block] = block_hash
        self.log.ops.append([REG, rid, index, block_hash, parent_hash, tokens])

    # --- internals -----------------------------------------------------------------------

    def _take(self) -> int:
        """One block for a table: the free list's head, else the least recently used cached block."""
        if self.free_list:
            block = self.free_list.popleft()
        else:
            block, _ = self.lru.popitem(last=False)
            del self.hash_map[self.block_hash.pop(block)]
        self.ref[block] = 1
        return block

    def _free(self, rid: str) -> None:
        self._free_gpu(rid)
        self._free_cpu(rid)

    def _free_gpu(self, rid: str) -> None:
        ref = self.ref
        for block in reversed(self.tables.pop(rid, ())):
            left = ref[block] - 1
            if left > 0:
                ref[block] = left
                continue
            del ref[block]
            if block in self.block_hash:
                self.tick += 1
                self.lru[block] = self.tick
            else:
                self.free_list.append(block)

    # --- snapshots and checks ------------------------------------------------------------

    def snapshot(self) -> PoolSnapshot:
        return PoolSnapshot(
            self.num_blocks,
            self.block_size,
            list(self.free_list),
            dict(self.ref),
            list(self.lru),
            dict(self.hash_map),
            {rid: list(t) for rid, t in self.tables.items()},
            self.tick,
            self.num_cpu_blocks,
            list(self.cpu_free_list),
            dict(self.cpu_ref),
            {rid: list(t) for rid, t in self.cpu_tables.items()},
        )

    def restore(self, snap: PoolSnapshot) -> None:
        """Take the replica's state as this manager's own (a scheduler taking a pool over)."""
        self.num_blocks, self.block_size = snap.num_blocks, snap.block_size
        self.free_list = deque(snap.free_list)
        self.ref = dict(snap.ref)
        self.lru = OrderedDict((b, i + 1) for i, b in enumerate(snap.lru))
        self.hash_map = dict(snap.hash_map)
        self.block_hash = {e.block: h for h, e in snap.hash_map.items()}
        self.tables = {rid: list(t) for rid, t in snap.tables.items()}
        self.tick = snap.tick
        self.num_cpu_blocks = snap.num_cpu_blocks
        self.cpu_free_list = deque(snap.cpu_free_list)
        self.cpu_ref = dict(snap.cpu_ref)
        self.cpu_tables = {rid: list(t) for rid, t in snap.cpu_tables.items()}

    def check(self) -> list[str]:
        from pagedserve.scheduler.fsck import check_cpu_state, check_state

        return check_state(
            num_blocks=self.num_blocks,
            free_list=list(self.free_list),
            ref=dict(self.ref),
            lru=list(self.lru),
            hash_map={h: e.block for h, e in self.hash_map.items()},
            block_hash=dict(self.block_hash),
            tables=dict(self.tables),
        ) + check_cpu_state(
            num_cpu_blocks=self.num_cpu_blocks,
            cpu_free_list=list(self.cpu_free_list),
            cpu_ref=dict(self.cpu_ref),
            cpu_tables=dict(self.cpu_tables),
        )
