"""An in-process `BlockPool`: the op interpreter over a `BlockManager`, for tests and for
running without Redis.

It reads the same op lists as the Redis pool's Lua script and keeps the same data layout (the
manager's free list, LRU and hash map), so both give the same answers to the same steps; the
engine uses it as the replica when no Redis is configured.
"""

from __future__ import annotations

from pagedserve.scheduler.block_manager import BlockManager, PoolSnapshot
from pagedserve.scheduler.block_pool import (
    ADMIT,
    ALLOC,
    COW,
    DROP,
    FORK,
    FREE,
    REG,
    SAVE,
    SWAP_IN,
    SWAP_OUT,
    Admission,
    Allocation,
    BlockCopy,
    BlockPool,
    OpResult,
    PoolCounts,
    StepOps,
    StepResult,
    StoredRequest,
    SwapMapping,
    parse_outputs,
    parse_progress,
)
from pagedserve.scheduler.hashing import parse_token_str


class InMemoryBlockPool(BlockPool):
    def __init__(
        self,
        num_blocks: int = 0,
        block_size: int = 16,
        epoch: str = "",
        model: str = "",
        num_cpu_blocks: int = 0,
    ) -> None:
        self.epoch = epoch
        self.model = model
        self.blocks = BlockManager(num_blocks, block_size, num_cpu_blocks)
        self.states: dict[str, dict[str, str]] = {}
        self.outputs: dict[str, str] = {}
        self.fence = 0

    @property
    def num_blocks(self) -> int:
        return self.blocks.num_blocks

    @property
    def block_size(self) -> int:
        return self.blocks.block_size

    # --- lifecycle ---------------------------------------------------------------------

    def init(self, num_blocks: int, block_size: int, epoch: str, model: str, num_cpu_blocks: int = 0) -> bool:
        same = (num_blocks, block_size, epoch, model, num_cpu_blocks) == (
            self.num_blocks,
            self.block_size,
            self.epoch,
            self.model,
            self.blocks.num_cpu_blocks,
        )
        if same:
            for rid in [*self.blocks.tables, *self.blocks.cpu_tables]:
                self.blocks._free(rid)
            return True
        self.blocks = BlockManager(num_blocks, block_size, num_cpu_blocks)
        self.epoch, self.model = epoch, model
        return False

    def reset(self, epoch: str | None = None) -> PoolCounts:
        if epoch is not None:
            self.epoch = epoch
        self.blocks.reset()
        self.states.clear()
        self.outputs.clear()
        return self.counts()

    def counts(self) -> PoolCounts:
        return self.blocks.counts()

    # --- the step ----------------------------------------------------------------------

    def apply(self, ops: StepOps, fence: int = 0) -> StepResult:
        for rid, status, ncomp, outs in parse_progress("".join(ops.progress)):
            state = self.states.setdefault(rid, {})
            state["status"], state["num_computed_tokens"] = status, ncomp
            self.outputs[rid] = self.outputs.get(rid, "") + outs
        results: list[OpResult] = [self._run(op) for op in ops.ops]
        self.blocks.log = StepOps()  # an interpreter keeps no log of its own
        return StepResult(results, self.counts())

    def _run(self, op: list) -> OpResult:
        code, rid = op[0], op[1]
        blocks = self.blocks
        if code == FREE:
            blocks._free(rid)
        elif code == ALLOC:
            got = blocks.allocate(rid, op[2])
            return Allocation(got is not None, got or [])
        elif code == ADMIT:
            shared = op[5] if len(op) > 5 else ()
            return blocks.admit(rid, [tuple(c) for c in op[4]], op[2], op[3], shared) or Admission(
                False, 0, []
            )
        elif code == FORK:
            blocks.fork(rid, op[2])
        elif code == COW:
            return blocks.cow(rid) or BlockCopy(False, -1, -1)
        elif code == SWAP_OUT:
            moved = blocks.swap_out(rid, op[2])
            return SwapMapping(moved is not None, moved or [])
        elif code == SWAP_IN:
            moved = blocks.swap_in(rid)
            return SwapMapping(moved is not None, moved or [])
        elif code == REG:
            blocks.register(rid, op[2], op[3], op[4], parse_token_str(op[5]))
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
            blocks._free(rid)
            self.states.pop(rid, None)
            self.outputs.pop(rid, None)
        else:
            raise ValueError(f"unknown block pool operation {code!r}")
        return None

    # --- reading back ------------------------------------------------------------------

    def snapshot(self) -> PoolSnapshot:
        return self.blocks.snapshot()

    def load_requests(self) -> list[StoredRequest]:
        return [
            StoredRequest.from_fields(rid, state, parse_outputs(self.outputs.get(rid, "")))
            for rid, state in self.states.items()
            if "params" in state
        ]

    def check(self) -> list[str]:
        return self.blocks.check()

    def seed(self, snap: PoolSnapshot, requests: list[list], epoch: str, model: str) -> None:
        """Take the whole pool as `snap` says, and these request states (SAVE op fields)."""
        self.blocks = BlockManager(snap.num_blocks, snap.block_size, snap.num_cpu_blocks)
        self.blocks.restore(snap)
        self.epoch, self.model = epoch, model
        self.states.clear()
        self.outputs.clear()
        for rid, prompt, params, priority, status, ncomp, outs in requests:
            self._run([SAVE, rid, prompt, params, priority, status, ncomp, outs])
