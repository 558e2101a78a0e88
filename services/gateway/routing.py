"""Many executor pools behind one gateway: which pool runs a request, and where it goes when
its pool fails.

Pools come from the registry in Redis (`--redis-url`; joins and leaves are followed every
`refresh` seconds, and a pool whose lease lapsed is out) or from static `--scheduler` flags
(each one pool: its scheduler, and standbys after commas). Each request is routed once, all
its choices to one pool:
- `cache_aware` (default): one pipelined Redis call reads, for every pool, how many leading
  blocks of the prompt its prefix cache holds (the scheduler's own chained hashes, from
  `scheduler/hashing.py`) and its load; the pool with the lowest
  `cost = prefill_weight * uncached prompt tokens + decode_weight * (running + waiting)` wins.
- `least_loaded`: the fewest running + waiting requests (then the most free blocks).
- `round_robin`: in turn.
A request that re-attaches after its pool's scheduler went away goes back to that pool while
the pool is live (its scheduler restarted, or a standby took over) and to another pool
otherwise — a migration: the prompt plus the tokens already delivered, at most
`--migration-limit` times.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, field

from pagedserve.common.errors import Unavailable
from pagedserve.common.params import SamplingParams
from pagedserve.common.pool_registry import PoolInfo, pool_key, read_pools_async
from pagedserve.common.redis_connect import RedisSetupError, check_async, connect_async
from pagedserve.common.stats import SchedulerStats
from pagedserve.gateway.downstream import SchedulerClient
from pagedserve.gateway.scheduler_stream import RequestUpdates
from pagedserve.scheduler.hashing import BlockHasher, model_salt

log = logging.getLogger(__name__)

ROUTING_POLICIES = ("cache_aware", "least_loaded", "round_robin")
DOWN_FOR = 5.0  # seconds a pool that failed a request is routed around


@dataclass(slots=True)
class Pool:
    pool_id: str
    client: SchedulerClient
    info: PoolInfo | None = None  # None for a static pool
    routed: int = 0
    down_until: float = 0.0  # a request left it as failed: routed around until then
    predicted_hit_tokens: int = 0
    actual_hit_tokens: int = 0
    hasher: BlockHasher | None = None


@dataclass(slots=True)
class _Assignment:
    pool_id: str
    migrations: int = 0
    predicted_hit_tokens: int = 0
    tried: set[str] = field(default_factory=set)


class PoolRouter:
    """Implements what the engine asks of a scheduler (`submit`, `abort`, `stats`, `ready`),
    over every pool."""

    def __init__(
        self,
        static: list[str],
        timeout: float,
        *,
        redis_url: str | None = None,
        policy: str = "cache_aware",
        prefill_weight: float = 1.0,
        decode_weight: float = 32.0,
        migration_limit: int = 3,
        refresh: float = 1.0,
        shared_stream: bool = True,
        state_redis_url: str | None = None,
    ) -> None:
        if policy not in ROUTING_POLICIES:
            raise ValueError(f"--routing must be one of {', '.join(ROUTING_POLICIES)}, got {policy!r}")
        self.timeout = timeout
        self.policy = policy
        self.prefill_weight = prefill_weight
        self.decode_weight = decode_weight
        self.migration_limit = migration_limit
        self.refresh = refresh
        self.shared_stream = shared_stream  # requests ride one Connect call per scheduler
        self.pools: dict[str, Pool] = {}
        for i, addresses in enumerate(static):
            self.pools[f"static-{i}"] = Pool(
                f"static-{i}", SchedulerClient(addresses, timeout, shared_stream=shared_stream)
            )
        self.redis = None
        self.redis_url = redis_url or ""
        if redis_url:
            self.redis = connect_async(redis_url, socket_timeout=2.0, socket_connect_timeout=1.0)
        # Where the pools' blocks are read for the KV map: the registry's Redis, or for static
        # pools the Redis their schedulers write (`--kv-map-redis-url`); None: no map.
        self.state_redis = self.redis
        if self.state_redis is None and state_redis_url:
            self.state_redis = connect_async(state_redis_url, socket_timeout=2.0, socket_connect_timeout=1.0)
        self.assignments: dict[str, _Assignment] = {}
        self.migrations_total = 0
        self._turn = itertools.count()
        self._watcher: asyncio.Task | None = None
        self._last_refresh = 0.0

    # --- discovery -------------------------------------------------------------------------

    async def refresh_pools(self) -> None:
        """Follow the registry: new pools in, pools whose lease lapsed out, moved schedulers re-dialled."""
        if self.redis is None:
            return
        self._last_refresh = time.monotonic()
        live = {p.pool_id: p for p in await read_pools_async(self.redis)}
        for pool_id, info in live.items():
            pool = self.pools.get(pool_id)
            if pool is None or pool.info is None or pool.info.scheduler != info.scheduler:
                if pool is not None:
                    await pool.client.close()
                log.info(
                    "pool %s at %s (%s, %d blocks)", pool_id, info.scheduler, info.model, info.num_blocks
                )
                self.pools[pool_id] = Pool(
                    pool_id,
                    SchedulerClient(info.scheduler, self.timeout, shared_stream=self.shared_stream),
                    info,
                    hasher=BlockHasher(model_salt(info.model, info.block_size), info.block_size),
                )
            else:
                pool.info = info
        for pool_id in [p for p, pool in self.pools.items() if pool.info is not None and p not in live]:
            log.info("pool %s left (its lease lapsed)", pool_id)
            await self.pools.pop(pool_id).client.close()

    async def check_redis(self) -> None:
        """At start-up: `RedisSetupError` when the registry's Redis refuses our credentials or
        certificates. A Redis that does not answer yet is left to the watcher to retry."""
        if self.redis is None:
            return
        try:
            await check_async(self.redis, self.redis_url)
        except RedisSetupError:
            raise
        except Exception as err:  # not a configuration error: the watcher retries
            log.warning("the pool registry's Redis does not answer yet: %s", err)

    def start(self) -> None:
        if self.redis is not None and self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(), name="pool-registry")

    async def _watch(self) -> None:
        while True:
            try:
                await self.refresh_pools()
            except Exception as err:  # Redis away: keep routing over the pools known
                log.warning("cannot read the pool registry: %s", err)
            await asyncio.sleep(self.refresh)

    # --- routing ---------------------------------------------------------------------------

    async def choose(self, request_id: str, prompt_ids: list[int], exclude: set[str] = frozenset()) -> Pool:
        if self.redis is not None and (
            not self.pools or time.monotonic() - self._last_refresh > 5 * self.refresh
        ):
            with contextlib.suppress(Exception):
                await self.refresh_pools()
        now = time.monotonic()
        candidates = [p for p in self.pools.values() if p.pool_id not in exclude and p.down_until <= now]
        if not candidates:  # every pool failed lately: try them all again
            candidates = [p for p in self.pools.values() if p.pool_id not in exclude]
        if not candidates:
            raise Unavailable("no pool can take the request" + (" (every pool failed it)" if exclude else ""))
        if len(candidates) == 1:
            return candidates[0]
        if self.policy == "round_robin" or self.redis is None:
            return candidates[next(self._turn) % len(candidates)]
        hits, loads = await self._score(prompt_ids, candidates)
        if self.policy == "least_loaded":
            best = min(candidates, key=lambda p: (loads[p.pool_id][0], -loads[p.pool_id][1]))
        else:

            def cost(p: Pool) -> float:
                uncached = len(prompt_ids) - hits[p.pool_id]
                return self.prefill_weight * uncached + self.decode_weight * loads[p.pool_id][0]

            best = min(candidates, key=lambda p: (cost(p), loads[p.pool_id][0]))
        best.predicted_hit_tokens += hits.get(best.pool_id, 0)
        return best

    async def _score(
        self, prompt_ids: list[int], pools: list[Pool]
    ) -> tuple[dict[str, int], dict[str, tuple[int, int]]]:
        """Per pool: prompt tokens its prefix cache holds (leading full blocks), and (requests
        running + waiting, available blocks) — one pipelined round trip for all pools."""
        pipe = self.redis.pipeline(transaction=False)
        chains = {}
        for p in pools:
            chain: list[str] = []
            if p.hasher is not None:
                bs = p.hasher.block_size
                p.hasher.extend(chain, prompt_ids[: ((len(prompt_ids) - 1) // bs) * bs])
            chains[p.pool_id] = chain
            if chain:
                pipe.hmget(pool_key(p.pool_id, "hash"), chain)
            pipe.hmget(pool_key(p.pool_id, "load"), ["running", "waiting", "available"])
        try:
            replies = iter(await pipe.execute())
        except Exception as err:
            log.warning("cannot score pools in Redis (%s); routing by turn", err)
            return {p.pool_id: 0 for p in pools}, {
                p.pool_id: (next(self._turn) % len(pools), 0) for p in pools
            }
        hits, loads = {}, {}
        in_flight: dict[str, int] = {}
        for a in self.assignments.values():
            in_flight[a.pool_id] = in_flight.get(a.pool_id, 0) + 1
        for p in pools:
            n = 0
            if chains[p.pool_id]:
                for value in next(replies):
                    if value is None:
                        break
                    n += 1
            hits[p.pool_id] = n * (p.hasher.block_size if p.hasher else 0)
            running, waiting, available = (int(v or 0) for v in next(replies))
            # The pool's own figure is a step old; a burst this gateway just routed counts at once.
            loads[p.pool_id] = (max(running + waiting, in_flight.get(p.pool_id, 0)), available)
        return hits, loads

    # --- the scheduler interface ------------------------------------------------------------

    def submit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        priority: int,
        progress: list[tuple[int, list[int], bool]] | None = None,
    ) -> RoutedStream:
        return RoutedStream(self, request_id, prompt_token_ids, sampling, priority, progress)

    async def open(self, stream: RoutedStream) -> RequestUpdates:
        """Pick the pool (or keep, or migrate) and start the Submit call."""
        rid = stream.request_id
        assigned = self.assignments.get(rid)
        if assigned is None:
            pool = await self.choose(rid, stream.prompt_token_ids)
            assigned = self.assignments[rid] = _Assignment(pool.pool_id)
            pool.routed += 1
        elif stream.progress is not None:  # a re-attach: the same pool while it is live, else another
            pool = self.pools.get(assigned.pool_id)
            if pool is None or not await pool.client.ready(timeout=1.0):
                if assigned.migrations >= self.migration_limit:
                    raise Unavailable(
                        f"request {rid}: its pool failed and it has moved {assigned.migrations} times "
                        "(--migration-limit)"
                    )
                assigned.tried.add(assigned.pool_id)
                if pool is not None:
                    pool.down_until = time.monotonic() + DOWN_FOR
                try:
                    pool = await self.choose(rid, stream.prompt_token_ids, exclude=assigned.tried)
                except Unavailable:
                    assigned.tried = {assigned.pool_id}
                    pool = self.pools.get(assigned.pool_id)
                    if pool is None:
                        raise
                if pool.pool_id != assigned.pool_id:
                    log.info("request %s moves from pool %s to pool %s", rid, assigned.pool_id, pool.pool_id)
                    old = self.pools.get(assigned.pool_id)
                    if old is not None:
                        asyncio.ensure_future(_abort_quietly(old.client, rid))
                    assigned.pool_id = pool.pool_id
                    assigned.migrations += 1
                    self.migrations_total += 1
        else:
            pool = self.pools[assigned.pool_id]
        return pool.client.submit(
            rid, stream.prompt_token_ids, stream.sampling, stream.priority, stream.progress
        )

    def finished(self, request_id: str, cached_prompt_tokens: int) -> None:
        """The request ended: forget where it ran; count its actual prefix hit."""
        assigned = self.assignments.pop(request_id, None)
        if assigned is not None and (pool := self.pools.get(assigned.pool_id)) is not None:
            pool.actual_hit_tokens += cached_prompt_tokens

    async def abort(self, request_id: str) -> bool:
        assigned = self.assignments.get(request_id)
        pools = [self.pools[assigned.pool_id]] if assigned and assigned.pool_id in self.pools else []
        if not pools:
            return False
        return await pools[0].client.abort(request_id)

    async def stats(self, timeout: float | None = None) -> SchedulerStats:
        """Every pool's Stats summed (limits from the first); Unavailable when none answers."""
        if self.redis is not None and not self.pools:
            with contextlib.suppress(Exception):
                await self.refresh_pools()
        answers = await asyncio.gather(
            *(p.client.stats(timeout) for p in self.pools.values()), return_exceptions=True
        )
        good = [a for a in answers if isinstance(a, SchedulerStats)]
        if not good:
            errors = [a for a in answers if isinstance(a, BaseException)]
            raise errors[0] if errors else Unavailable("no pool is registered")
        total = SchedulerStats(**{f: getattr(good[0], f) for f in good[0].__dataclass_fields__})
        for s in good[1:]:
            for f in ("blocks_total", "blocks_used", "blocks_cached", "blocks_free", "requests_running",
                      "requests_waiting", "preemptions_total", "prefix_cache_hit_tokens",
                      "prefix_cache_query_tokens", "generated_tokens_total", "steps_total", "resumed_total",
                      "cpu_blocks_total", "swapped_blocks", "swap_out_blocks_total", "swap_in_blocks_total"):  # fmt: skip
                setattr(total, f, getattr(total, f) + getattr(s, f))
            total.max_model_len = min(total.max_model_len, s.max_model_len) or total.max_model_len
        return total

    async def ready(self, timeout: float | None = None) -> bool:
        if self.redis is not None and not self.pools:
            with contextlib.suppress(Exception):
                await self.refresh_pools()
        answers = await asyncio.gather(*(p.client.ready(timeout) for p in self.pools.values()))
        return any(answers)

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await asyncio.gather(*(p.client.close() for p in self.pools.values()), return_exceptions=True)
        if self.redis is not None:
            await self.redis.aclose()
        if self.state_redis is not None and self.state_redis is not self.redis:
            await self.state_redis.aclose()


class RoutedStream:
    """A Submit stream whose pool is chosen when it is first read (routing needs a Redis call)."""

    def __init__(self, router: PoolRouter, request_id: str, prompt_token_ids: list[int],
                 sampling: SamplingParams, priority: int, progress) -> None:  # fmt: skip
        self.router = router
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.sampling = sampling
        self.priority = priority
        self.progress = progress
        self._inner: RequestUpdates | None = None
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True
        if self._inner is not None:
            self._inner.cancel()

    async def __aiter__(self):
        self._inner = await self.router.open(self)
        if self._cancelled:
            self._inner.cancel()
            return
        async for update in self._inner:
            yield update


async def _abort_quietly(client: SchedulerClient, request_id: str) -> None:
    with contextlib.suppress(Exception):
        await client.abort(request_id)
