"""Where a pool lives in Redis.

Every key of pool `ID` starts with `pagedserve:{ID}:`; the braces are a Redis Cluster hash
tag, so a whole pool sits in one slot and one script can touch all of it.

| key | type | holds |
|---|---|---|
| `meta` | hash | num_blocks, block_size, epoch, model, tick (the LRU clock), num_cpu_blocks |
| `free` | list | free blocks: allocation pops the head, a free pushes the tail |
| `ref` | hash | block -> ref_cnt, only for blocks with ref_cnt > 0 (so HLEN = used) |
| `lru` | zset | cached-evictable blocks scored by the tick they were released at |
| `hash` | hash | block hash -> "block|parent hash|token ids" |
| `bhash` | hash | block -> its hash (cached blocks, used or evictable) |
| `table:<rid>` | list | the request's block table |
| `cfree` | list | free CPU blocks (swap space), popped at the head, pushed at the tail |
| `cref` | hash | CPU block -> ref_cnt, only for CPU blocks holding swapped-out KV |
| `ctable:<rid>` | list | a swapped-out request's CPU block table |
| `req:<rid>` | hash | prompt, params, priority, status, num_computed_tokens |
| `out:<rid>` | string | output token ids so far, "1,2,3," (a step appends) |
| `reqs` | set | request ids that have a table or state |
"""

from __future__ import annotations


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class PoolKeys:
    __slots__ = ("pool_id", "prefix", "meta")

    def __init__(self, pool_id: str) -> None:
        if not pool_id or "{" in pool_id or "}" in pool_id:
            raise ValueError(f"pool id must be non-empty and free of braces, got {pool_id!r}")
        self.pool_id = pool_id
        self.prefix = f"pagedserve:{{{pool_id}}}:"
        # The scripts take this one key and derive the others from it (same slot).
        self.meta = self.prefix + "meta"

    def key(self, name: str) -> str:
        return self.prefix + name

    def table(self, request_id: str) -> str:
        return f"{self.prefix}table:{request_id}"

    def ctable(self, request_id: str) -> str:
        return f"{self.prefix}ctable:{request_id}"

    def req(self, request_id: str) -> str:
        return f"{self.prefix}req:{request_id}"

    def out(self, request_id: str) -> str:
        return f"{self.prefix}out:{request_id}"

    @property
    def table_scan_pattern(self) -> str:
        return _glob_escape(self.prefix) + "table:*"

    @property
    def ctable_scan_pattern(self) -> str:
        return _glob_escape(self.prefix) + "ctable:*"


def pool_id_for(executor_address: str) -> str:
    """The default pool id of an executor: its address, made safe for a key."""
    return "".join(c if c.isalnum() or c in "-_.:" else "_" for c in executor_address)
