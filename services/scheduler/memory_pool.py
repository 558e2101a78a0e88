"""An in-process `BlockPool`, for unit tests and for running without Redis.

It interprets the same operation lists as the Redis pool's Lua script, with the same data
layout (a free list popped at the head and pushed at the tail, an LRU ordered by a tick,
hash -> (block, parent hash, tokens)), so both give the same answers to the same steps.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from pagedserve.scheduler.block_pool import (
    ADMIT,
    ALLOC,
    COW,
    DROP,
    FORK,
    FREE,
    REG,
    SAVE,
    Admission,
    Allocation,
    BlockCopy,
    BlockPool,
    OpResult,
    PoolCounts,
    StepOps,
    StepResult,
    parse_progress,
)


class InMemoryBlockPool(BlockPool):
    def __init__(self, num_blocks: int = 0, block_size: int = 16, epoch: str = "", model: str = "") -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.epoch = epoch
        self.model = model
        self.reset()

    # --- lifecycle ---------------------------------------------------------------------

    def init(self, num_blocks: int, block_size: int, epoch: str, model: str) -> bool:
        same = (num_blocks, block_size, epoch, model) == (
            self.num_blocks,
            self.block_size,
            self.epoch,
            self.model,
        )
        if same:
            for rid in list(self.tables):
                self._free(rid)
            self.states.clear()
            self.outputs.clear()
            return True
        self.num_blocks, self.block_size, self.model = num_blocks, block_size, model
        self.reset(epoch)
        return False

    def reset(self, epoch: str | None = None) -> PoolCounts:
        if epoch is not None:
            self.epoch = epoch
        self.free_list: deque[int] = deque(range(self.num_blocks))
        self.ref: dict[int, int] = {}
        self.lru: OrderedDict[int, int] = OrderedDict()  # block -> tick, oldest first
        self.hash_map: dict[str, tuple[int, str, str]] = {}  # hash -> (block, parent hash, tokens)
        self.block_hash: dict[int, str] = {}
        self.tables: dict[str, list[int]] = {}
        self.states: dict[str, dict[str, str]] = {}
        self.outputs: dict[str, str] = {}
        self.tick = 0
        return self.counts()

    def counts(self) -> PoolCounts:
        return PoolCounts(len(self.free_list), len(self.lru), len(self.ref))

    # --- the step ----------------------------------------------------------------------

    def apply(self, ops: StepOps) -> StepResult:
        for rid, status, ncomp, outs in parse_progress("".join(ops.progress)):
            state = self.states.setdefault(rid, {})
            state["status"], state["num_computed_tokens"] = status, ncomp
            self.outputs[rid] = self.outputs.get(rid, "") + outs
        results: list[OpResult] = []
        for op in ops.ops:
            results.append(self._run(op))
        return StepResult(results, self.counts())

    def _run(self, op: list) -> OpResult:
        code, rid = op[0], op[1]
        if code == FREE:
            self._free(rid)
        elif code == ALLOC:
            return self._alloc(rid, op[2])
        elif code == ADMIT:
            return self._admit(rid, op[2], op[3], op[4])
        elif code == FORK:
            self._fork(rid, op[2])
        elif code == COW:
            return self._cow(rid)
        elif code == REG:
            self._register(rid, op[2], op[3], op[4], op[5])
        elif code == SAVE:
            _, _, prompt, params, priority, status, ncomp, outs = op
            self.states[rid] = {
                "prompt": prompt,
                "params": params,
                "priority": str(priority),
                "status": str(status),
                "num_computed_tokens": str(ncomp),
            }
            self.outputs[rid] = outs
        elif code == DROP:
            self._free(rid)
            self.states.pop(rid, None)
            self.outputs.pop(rid, None)
        else:
            raise ValueError(f"unknown block pool operation {code!r}")
        return None

    def _available(self) -> int:
        return len(self.free_list) + len(self.lru)

    def _take(self) -> int:
        """One block for a table: the free list's head, else the least recently used cached block."""
        if self.free_list:
            block = self.free_list.popleft()
        else:
            block, _ = self.lru.popitem(last=False)
            del self.hash_map[self.block_hash.pop(block)]
        self.ref[block] = 1
        return block

    def _release(self, block: int) -> None:
        left = self.ref[block] - 1
        if left > 0:
            self.ref[block] = left
            return
        del self.ref[block]
        if block in self.block_hash:
            self.tick += 1
            self.lru[block] = self.tick
        else:
            self.free_list.append(block)

    def _free(self, rid: str) -> None:
        for block in reversed(self.tables.pop(rid, [])):
            self._release(block)

    def _alloc(self, rid: str, n: int) -> Allocation:
        if n > self._available():
            return Allocation(False, [])
        new = [self._take() for _ in range(n)]
        if new:
            self.tables.setdefault(rid, []).extend(new)
        return Allocation(True, new)

    def _admit(self, rid: str, num_tokens: int, num_new_tokens: int, chain: list) -> Admission:
        if self.tables.get(rid):
            return Admission(False, 0, [])
        hits: list[int] = []
        parent = ""
        num_from_lru = 0
        for block_hash, tokens in chain:
            entry = self.hash_map.get(block_hash)
            if entry is None or entry[1] != parent or entry[2] != tokens or entry[0] in hits:
                break
            hits.append(entry[0])
            num_from_lru += entry[0] not in self.ref
            parent = block_hash
        bs = self.block_size
        covered = min(num_tokens, len(hits) * bs + num_new_tokens)
        num_fresh = -(-covered // bs) - len(hits)
        if max(num_fresh, 0) + num_from_lru > self._available():
            return Admission(False, 0, [])
        for block in hits:
            if block in self.ref:
                self.ref[block] += 1
            else:
                del self.lru[block]
                self.ref[block] = 1
        table = hits + [self._take() for _ in range(max(num_fresh, 0))]
        if table:
            self.tables[rid] = table
        return Admission(True, len(hits), list(table))

    def _fork(self, parent: str, child: str) -> None:
        table = self.tables.get(parent, [])
        if not table or parent == child or self.tables.get(child):
            return
        for block in table:
            self.ref[block] += 1
        self.tables.setdefault(child, []).extend(table)

    def _cow(self, rid: str) -> BlockCopy:
        table = self.tables.get(rid)
        if not table or self.ref[table[-1]] <= 1:
            return BlockCopy(True, -1, -1)
        if self._available() < 1:
            return BlockCopy(False, -1, -1)
        src = table[-1]
        dst = self._take()
        self.ref[src] -= 1
        table[-1] = dst
        return BlockCopy(True, src, dst)

    def _register(self, rid: str, index: int, block_hash: str, parent: str, tokens: str) -> None:
        table = self.tables.get(rid, [])
        if not 0 <= index < len(table):
            return
        block = table[index]
        if block in self.block_hash or block_hash in self.hash_map:
            return
        self.hash_map[block_hash] = (block, parent, tokens)
        self.block_hash[block] = block_hash

    # --- fsck --------------------------------------------------------------------------

    def check(self) -> list[str]:
        from pagedserve.scheduler.fsck import check_state

        return check_state(
            num_blocks=self.num_blocks,
            free_list=list(self.free_list),
            ref=dict(self.ref),
            lru=list(self.lru),
            hash_map={h: e[0] for h, e in self.hash_map.items()},
            block_hash=dict(self.block_hash),
            tables=dict(self.tables),
        )
