"""CPU blocks: where a swapped-out sequence's KV waits while its GPU blocks serve others.

Part of `BlockManager` (block_manager.py). The executor holds `num_cpu_blocks` blocks of the
same per-block layout as its GPU pool (`--swap-space`). A CPU block is exactly one of free (on
`cpu_free_list`) or used (`cpu_ref` > 0, pointed at by `cpu_tables` entries); free + used ==
num_cpu_blocks, and cpu_ref equals the number of CPU-table entries that point at the block.
The scheduler never gives a sequence a device table and a CPU table at once (the op language
would allow it; the accounting stays consistent either way).

Sharing survives a swap: `swap_out` of a group (the live sequences of one request, e.g. the
choices of an n > 1 request) maps each distinct GPU block to ONE CPU block, so a prompt block
shared by four choices takes one CPU block with ref_cnt 4; `swap_in` maps each distinct CPU
block back to one GPU block. Both check first and change nothing when short (None), and log
one op, which the replicas (memory_pool.py, redis_lua.py) run the same way: free lists popped
at the head and pushed at the tail, tables walked in order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from pagedserve.scheduler.block_pool import SWAP_IN, SWAP_OUT


class SwapBlocksMixin:
    num_cpu_blocks: int

    def reset_cpu(self) -> None:
        """Every CPU block free, no CPU table."""
        self.cpu_free_list: deque[int] = deque(range(self.num_cpu_blocks))
        self.cpu_ref: dict[int, int] = {}
        self.cpu_tables: dict[str, list[int]] = {}

    @property
    def num_cpu_free(self) -> int:
        return len(self.cpu_free_list)

    def num_distinct_blocks(self, tables: Sequence[Sequence[int]]) -> int:
        return len({b for table in tables for b in table})

    def swap_out(self, rids: Sequence[str], lengths: Sequence[int]) -> list[tuple[int, int]] | None:
        """Move the first `lengths[i]` blocks of each sequence's GPU table to CPU blocks (one CPU
        block per distinct GPU block) and free the GPU tables, last block first. Returns the
        (gpu, cpu) pairs the executor copies, in order; None (nothing changed) when the CPU
        blocks are short."""
        kept = [self.tables.get(rid, [])[:n] for rid, n in zip(rids, lengths, strict=True)]
        if self.num_distinct_blocks(kept) > len(self.cpu_free_list) or any(
            r in self.cpu_tables for r in rids
        ):
            return None
        mapping: dict[int, int] = {}
        for rid, blocks in zip(rids, kept, strict=True):
            table = []
            for gpu in blocks:
                cpu = mapping.get(gpu)
                if cpu is None:
                    cpu = mapping[gpu] = self.cpu_free_list.popleft()
                    self.cpu_ref[cpu] = 0
                self.cpu_ref[cpu] += 1
                table.append(cpu)
            if table:
                self.cpu_tables[rid] = table
        for rid in rids:
            self._free_gpu(rid)
        self.log.ops.append([SWAP_OUT, list(rids), list(lengths)])
        return list(mapping.items())

    def swap_in(self, rids: Sequence[str]) -> list[tuple[int, int]] | None:
        """Give each sequence a GPU table again, one GPU block per distinct CPU block (free list
        first, then evicted cached blocks), and free the CPU tables. Returns the (cpu, gpu)
        pairs the executor copies; None (nothing changed) when the GPU blocks are short."""
        cpu_tables = [self.cpu_tables.get(rid, []) for rid in rids]
        if self.num_distinct_blocks(cpu_tables) > self.num_available or any(self.tables.get(r) for r in rids):
            return None
        mapping: dict[int, int] = {}
        for rid, cpu_table in zip(rids, cpu_tables, strict=True):
            table = []
            for cpu in cpu_table:
                gpu = mapping.get(cpu)
                if gpu is None:
                    gpu = mapping[cpu] = self._take()
                else:
                    self.ref[gpu] += 1
                table.append(gpu)
            if table:
                self.tables[rid] = table
        for rid in rids:
            self._free_cpu(rid)
        self.log.ops.append([SWAP_IN, list(rids)])
        return list(mapping.items())

    def _free_cpu(self, rid: str) -> None:
        for cpu in reversed(self.cpu_tables.pop(rid, ())):
            left = self.cpu_ref[cpu] - 1
            if left > 0:
                self.cpu_ref[cpu] = left
            else:
                del self.cpu_ref[cpu]
                self.cpu_free_list.append(cpu)
