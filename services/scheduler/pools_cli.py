"""`pagedserve pools`: the executor pools registered in Redis, and their load.

One line per live pool (its lease key exists): id, the scheduler address gateways dial, the
model, the pool's size, the load its scheduler last published (running and waiting requests,
available blocks, tokens held) and how old that sample is. `--all` adds the pools whose lease
lapsed (registered once, no scheduler holds them now); `--json` prints the same as one JSON
document for scripts.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict

from pagedserve.common.pool_registry import PoolInfo, read_pools
from pagedserve.common.redis_connect import url_arg

COLUMNS = ("POOL", "SCHEDULER", "MODEL", "BLOCKS", "RUNNING", "WAITING", "AVAILABLE", "TOKENS", "AGE")


def load_age_s(pool: PoolInfo, now_ms: int) -> float | None:
    """Seconds since the pool's scheduler wrote its load (None: it never did)."""
    if pool.load is None or pool.load.ms <= 0:
        return None
    return max(now_ms - pool.load.ms, 0) / 1000


def pool_row(pool: PoolInfo, now_ms: int, with_state: bool) -> list[str]:
    age = load_age_s(pool, now_ms)
    load = pool.load
    row = [
        pool.pool_id,
        pool.scheduler,
        pool.model or "-",
        f"{pool.num_blocks}x{pool.block_size}",
        *(
            (str(load.running), str(load.waiting), str(load.available), str(load.tokens))
            if load is not None
            else ("-",) * 4
        ),
        "-" if age is None else f"{age:.1f}s",
    ]
    if with_state:
        row.append("live" if pool.live else "lapsed")
    return row


def format_table(pools: list[PoolInfo], now_ms: int, with_state: bool = False) -> str:
    """The pools as aligned columns, a header first."""
    header = [*COLUMNS, "LEASE"] if with_state else list(COLUMNS)
    rows = [header, *(pool_row(p, now_ms, with_state) for p in pools)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def pools_json(pools: list[PoolInfo], now_ms: int) -> str:
    """The pools as a JSON list: every `PoolInfo` field, plus `load_age_s`."""
    return json.dumps([{**asdict(p), "load_age_s": load_age_s(p, now_ms)} for p in pools], indent=2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url",
        type=url_arg,
        required=True,
        help="Redis holding the pool registry, e.g. redis://localhost:6379/0",
    )
    parser.add_argument("--all", action="store_true", help="also list pools whose lease lapsed")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def main(args: argparse.Namespace) -> int:
    from pagedserve.common.redis_connect import check, connect

    client = connect(args.redis_url, decode_responses=True)
    try:
        check(client, args.redis_url, strict=True)
        pools = read_pools(client, only_live=not args.all)
    finally:
        client.close()
    now_ms = int(time.time() * 1000)
    if args.json:
        print(pools_json(pools, now_ms))
    elif pools:
        print(format_table(pools, now_ms, with_state=args.all))
    else:
        print("no live pools registered" if not args.all else "no pools registered")
    return 0
