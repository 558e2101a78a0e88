"""The block pool: KV block accounting for one executor pool, changed one step at a time.

The scheduler never changes the pool one call at a time. It records a step's operations in
a `StepOps` (frees, allocations, prefix-cache admissions, forks, copy-on-write, hash
registrations, request-state writes) and hands them to `BlockPool.apply`, which runs them
all, in order, atomically, and returns a `StepResult`: the block ids each allocation got and
the pool's counts afterwards. With Redis behind it that is one script call: O(1) round
trips per step whatever the batch size.

Operations that can run out of blocks (`allocate`, `admit`, `cow`) check first and change
nothing when the blocks are not there; they report `ok=False` (backpressure is a return
value). The scheduler plans with local counts so that this does not happen, but a result is
always checked.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from pagedserve.common.params import SamplingParams
from pagedserve.scheduler.hashing import token_str

if TYPE_CHECKING:
    from pagedserve.scheduler.block_manager import PoolSnapshot

# Operation codes; an operation is a list `[code, request_id, *args]`, the form both pool
# implementations interpret (the Redis one after JSON encoding, inside its Lua script).
FREE, ALLOC, ADMIT, FORK, COW, REG, SAVE, DROP = (
    "free",
    "alloc",
    "admit",
    "fork",
    "cow",
    "reg",
    "save",
    "drop",
)
# Swap (swap_blocks.py): ["swapout", [rid...], [num_blocks...]] moves each sequence's first
# blocks to CPU blocks (one per distinct GPU block) and frees its GPU table;
# ["swapin", [rid...]] moves CPU tables back to GPU blocks. Their request id slot is a list.
SWAP_OUT, SWAP_IN = "swapout", "swapin"
# Progress records (`StepOps.update`, one per running sequence per step) are the bulk of a
# step, so they skip JSON: "rid US status US num_computed US outputs RS", parsed with one
# pattern in Lua. Request ids never hold control characters (the scheduler refuses them).
US, RS = "\x1f", "\x1e"


class Allocation(NamedTuple):
    ok: bool
    block_ids: list[int]  # appended to the request's block table, in order


class Admission(NamedTuple):
    ok: bool
    num_hit_blocks: int  # leading blocks served from the prefix cache
    block_ids: list[int]  # the whole new block table: the hits, then fresh blocks


class BlockCopy(NamedTuple):
    ok: bool
    src: int  # -1 when the last block was not shared (no copy needed)
    dst: int


class SwapMapping(NamedTuple):
    ok: bool
    pairs: list[tuple[int, int]]  # (src, dst): (gpu, cpu) for a swap-out, (cpu, gpu) for a swap-in


class PoolCounts(NamedTuple):
    num_free: int  # on the free list (no hash, no reference)
    num_cached: int  # cached and evictable (a hash, no reference)
    num_used: int  # referenced by at least one block table

    @property
    def num_total(self) -> int:
        return self.num_free + self.num_cached + self.num_used

    @property
    def num_available(self) -> int:
        """Blocks an allocation may take: free ones first, then evicted cached ones."""
        return self.num_free + self.num_cached


OpResult = Allocation | Admission | BlockCopy | SwapMapping | None


@dataclass(slots=True)
class StepResult:
    results: list[OpResult]  # one per operation, in order; None for operations with no answer
    counts: PoolCounts

    def __getitem__(self, handle: int) -> OpResult:
        return self.results[handle]


@dataclass(slots=True)
class StoredRequest:
    """One sequence's state as the replica holds it: what a new scheduler needs to go on."""

    seq_id: str
    request_id: str
    index: int  # choice index, or -1 for the shared prompt sequence of an n > 1 request
    prompt_token_ids: list[int]
    sampling: SamplingParams  # the request's, n and seed included
    priority: int
    status: int  # SequenceStatus
    finish_reason: int  # FinishReason, when finished
    num_computed_tokens: int
    output_token_ids: list[int]

    @classmethod
    def from_fields(cls, seq_id: str, state: dict, outputs: list[int]) -> StoredRequest:
        """From a stored `req:` hash (str or bytes values) and its parsed outputs."""
        get = {_text(k): _text(v) for k, v in state.items()}
        params = json.loads(get["params"])
        status, _, reason = get["status"].partition(".")
        return cls(
            seq_id=seq_id,
            request_id=params["rid"],
            index=int(params["i"]),
            prompt_token_ids=[int(t) for t in get["prompt"].split(",") if t],
            sampling=SamplingParams(**params["s"]),
            priority=int(get["priority"]),
            status=int(status),
            finish_reason=int(reason or 0),
            num_computed_tokens=int(get["num_computed_tokens"]),
            output_token_ids=outputs,
        )


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def status_field(status: int, finish_reason: int = 0) -> str:
    """A sequence's stored status: "2", or "3.1" for finished with reason 1."""
    return f"{status}.{finish_reason}" if finish_reason else str(status)


class StepOps:
    """A step's operations, in the order they are to run. Methods that have an answer return
    a handle: the index of that answer in `StepResult.results`."""

    __slots__ = ("ops", "progress", "load")

    def __init__(self) -> None:
        self.ops: list[list] = []
        self.progress: list[str] = []  # update() records, applied before `ops`
        self.load = ""  # "running,waiting,tokens,ms" for the pool registry, when set

    def __len__(self) -> int:
        return len(self.ops) + len(self.progress)

    def _add(self, op: list) -> int:
        self.ops.append(op)
        return len(self.ops) - 1

    def free(self, request_id: str) -> None:
        """Drop the request's block table, last block first: each block's ref_cnt goes down;
        one that reaches 0 becomes cached-evictable when it has a hash (the last blocks of the
        table are then evicted first), or goes back on the free list otherwise."""
        self._add([FREE, request_id])

    def allocate(self, request_id: str, num_blocks: int) -> int:
        """Append `num_blocks` blocks to the table: free list first, else evict the least
        recently used cached block (dropping its hash). All or nothing."""
        return self._add([ALLOC, request_id, num_blocks])

    def admit(
        self,
        request_id: str,
        chain: Sequence[tuple[str, str]],
        num_tokens: int,
        num_new_tokens: int,
        shared: Sequence[int] = (),
    ) -> int:
        """Give a request with no table its table: the longest run of `chain` (hash, token_str)
        found in the cache, each hit confirmed against its stored tokens and parent hash (a hit
        takes a reference; an evictable one leaves the LRU), then the `shared` blocks (in use by
        other tables; each takes a reference), then fresh blocks to cover
        `min(num_tokens, hit and shared tokens + num_new_tokens)` tokens. All or nothing."""
        op = [ADMIT, request_id, num_tokens, num_new_tokens, [list(c) for c in chain]]
        return self._add([*op, list(shared)] if shared else op)

    def fork(self, parent_id: str, child_id: str) -> None:
        """The child shares the parent's whole table; each block's ref_cnt goes up. A child
        that already has a table is left as it is (a table never holds a block twice)."""
        self._add([FORK, parent_id, child_id])

    def cow(self, request_id: str) -> int:
        """Copy-on-write of the last block: when it is shared, the request gets a fresh block
        in its place and drops its reference on the old one; the answer's (src, dst) tells the
        executor which block to copy."""
        return self._add([COW, request_id])

    def register(
        self, request_id: str, block_index: int, block_hash: str, parent_hash: str, token_ids: Sequence[int]
    ) -> None:
        """Cache a block that became full under its chained hash. A block that already has a
        hash, or a hash some other block holds, is left as it is."""
        self._add([REG, request_id, block_index, block_hash, parent_hash, token_str(token_ids)])

    def update_token(self, request_id: str, status: str, num_computed_tokens: int, token_id: int) -> None:
        """`update` with one new output token (the common decode step), formatted directly."""
        self.progress.append(f"{request_id}{US}{status}{US}{num_computed_tokens}{US}{token_id},{RS}")

    def save(
        self,
        request_id: str,
        *,
        prompt_token_ids: Sequence[int],
        params_json: str,
        priority: int,
        status: str,
        num_computed_tokens: int,
        output_token_ids: Sequence[int],
    ) -> None:
        """Write a request's whole state (first sight, or after the pool was reset)."""
        self._add(
            [
                SAVE,
                request_id,
                token_str(prompt_token_ids),
                params_json,
                priority,
                status,
                num_computed_tokens,
                _outputs_str(output_token_ids),
            ]
        )

    def update(
        self, request_id: str, status: str, num_computed_tokens: int, new_output_token_ids: Sequence[int]
    ) -> None:
        """Write a request's progress: status, computed tokens, and the outputs made since the
        last write. A step's progress writes run before its other operations: a request is
        always saved a step before its first progress write, and a drop in the same step as a
        progress write must win."""
        self.progress.append(
            f"{request_id}{US}{status}{US}{num_computed_tokens}{US}{_outputs_str(new_output_token_ids)}{RS}"
        )

    def swap_out(self, request_ids: Sequence[str], lengths: Sequence[int]) -> int:
        """Move the first `lengths[i]` blocks of each table to CPU blocks, one per distinct GPU
        block (sharing kept), and free the GPU tables. All or nothing."""
        return self._add([SWAP_OUT, list(request_ids), list(lengths)])

    def swap_in(self, request_ids: Sequence[str]) -> int:
        """Move each CPU table back to GPU blocks, one per distinct CPU block. All or nothing."""
        return self._add([SWAP_IN, list(request_ids)])

    def drop(self, request_id: str) -> None:
        """Forget a request: free its table (if any) and delete its state."""
        self._add([DROP, request_id])

    def encode(self) -> tuple[str, str]:
        """(the operations as JSON, the progress records)."""
        return json.dumps(self.ops, separators=(",", ":")), "".join(self.progress)


def _outputs_str(token_ids: Sequence[int]) -> str:
    # Outputs are stored as "1,2,3," so that a step's new tokens are one APPEND.
    return ",".join(map(str, token_ids)) + "," if token_ids else ""


def parse_outputs(stored: str) -> list[int]:
    return [int(t) for t in stored.split(",") if t]


def parse_progress(records: str) -> list[tuple[str, str, str, str]]:
    """(request_id, status, num_computed_tokens, outputs) of each progress record."""
    return [tuple(rec.split(US)) for rec in records.split(RS) if rec]  # type: ignore[misc]


class BlockPool(ABC):
    """KV block accounting for one executor pool of `num_blocks` blocks of `block_size` tokens.

    Invariants, true after every `apply`, `init` and `reset` (`check()` verifies them):
    - every block is exactly one of: free (on the free list, no hash), used (ref_cnt > 0), or
      cached-evictable (ref_cnt == 0, has a hash, in the LRU);
    - a block's ref_cnt equals the number of block-table entries pointing at it;
    - num_free + num_used + num_cached == num_blocks;
    - the hash map and each block's hash agree one to one; a hash maps to exactly one block.
    """

    num_blocks: int
    block_size: int

    @abstractmethod
    def init(self, num_blocks: int, block_size: int, epoch: str, model: str, num_cpu_blocks: int = 0) -> bool:
        """Make the pool match an executor. When the stored pool has the same geometry, epoch
        and model, its cached blocks are kept and every leftover table is freed (a scheduler
        restart: the blocks of what was not committed are recomputed, mostly as cache hits);
        otherwise the blocks are reset. Stored request states are kept either way, for the
        new scheduler to resume. CPU tables (swapped-out sequences) are freed like GPU ones: a
        new scheduler recomputes what was swapped. Returns whether the cache was kept."""

    fence: int = 0  # this writer's fencing token (0: none, e.g. an unleased test pool)

    @abstractmethod
    def reset(self, epoch: str | None = None) -> PoolCounts:
        """Drop everything: tables, request state, cached hashes; every block free
        (e.g. the executor restarted and its pool is gone)."""

    @abstractmethod
    def apply(self, ops: StepOps, fence: int = 0) -> StepResult:
        """Run a step's operations in order, atomically, in one round trip. With a fencing
        token (> 0) the pool refuses the step (raises `Fenced`) unless the token is the
        pool's current one: a scheduler that lost its lease cannot write."""

    @abstractmethod
    def snapshot(self) -> PoolSnapshot:
        """The whole block accounting, for a new scheduler to take over and for comparison."""

    @abstractmethod
    def load_requests(self) -> list[StoredRequest]:
        """Every stored sequence state (in-flight requests a new scheduler resumes)."""

    @abstractmethod
    def counts(self) -> PoolCounts: ...

    @abstractmethod
    def check(self) -> list[str]:
        """Every broken invariant, one line each; empty when the pool is consistent."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections, if any."""


def decode_result(op: list, raw) -> OpResult:
    """Turn one raw answer (lists and ints, as the Lua script encodes them) into its NamedTuple."""
    code = op[0]
    if code == ALLOC:
        return Allocation(bool(raw[0]), _int_list(raw[1]))
    if code == ADMIT:
        return Admission(bool(raw[0]), int(raw[1]), _int_list(raw[2]))
    if code == COW:
        return BlockCopy(bool(raw[0]), int(raw[1]), int(raw[2]))
    if code in (SWAP_OUT, SWAP_IN):
        moved = raw[1] if isinstance(raw[1], list) else []
        return SwapMapping(bool(raw[0]), [(int(a), int(b)) for a, b in moved])
    return None


def _int_list(raw) -> list[int]:
    # Lua's cjson encodes an empty table as {}.
    return [int(b) for b in raw] if isinstance(raw, list) else []
