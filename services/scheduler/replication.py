"""Write-behind to the replica, and the lease that makes this scheduler its only writer.

Each step the engine hands `ship` the block manager's log; the replica call runs in a worker
thread, concurrently with the executor call, strictly in order and at most one in flight (a
step whose predecessor's write has not landed waits for it first). The executor never waits
on Redis.

When the replica cannot be trusted — a write failed (Redis down), its counts disagree with
ours, or the pool was reset — it is marked stale and gets the whole state (`seed`) once it
answers again, at most once a second; logs in between are dropped, the whole write covers
them. A refused fencing token (`Fenced`) means another scheduler holds the pool: `fenced` is
set and the engine stops stepping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pagedserve.common.errors import Fenced
from pagedserve.scheduler.block_pool import BlockPool, PoolCounts, StepOps

if TYPE_CHECKING:
    from pagedserve.scheduler.lease import Lease
    from pagedserve.scheduler.scheduler import Scheduler

log = logging.getLogger(__name__)

RESEED_INTERVAL = 1.0


class Replicator:
    def __init__(self, replica: BlockPool, lease: Lease | None = None, *, model: str = "") -> None:
        self.replica = replica
        self.lease = lease
        self.model = model
        self.stale = False  # the replica needs the whole state
        self.fenced: str | None = None  # why this scheduler may no longer write
        self.available = True  # the last call to the replica answered
        self.num_writes = 0
        self.num_full_writes = 0
        self._last_seed_try = 0.0
        self._inflight: asyncio.Future | None = None
        self._renewer: asyncio.Task | None = None
        self.wake: Callable[[], object] = lambda: None  # the engine's: a whole write is due
        self.registration: dict | None = (
            None  # pool_registry.register's fields, written again after a whole write
        )

    # --- the step's write ------------------------------------------------------------------

    async def ship(self, scheduler: Scheduler, *, final: bool = False) -> None:
        """Send what changed since the last call (or everything, when the replica is stale).
        Returns once the write is under way; waits first for the previous one to land (at
        most one in flight, so writes land in order). `final` (a stop): a whole write is
        tried now, whenever the last one was."""
        if final:
            self._last_seed_try = 0.0
        if self._inflight is not None and not self._inflight.done():
            if not self.available:
                # The replica is not answering: never let a hung write hold the step loop.
                # This log is dropped; a whole write covers it once the replica is back.
                self.stale = True
                scheduler.blocks.take_log()
                return
            await self._inflight
        if self.fenced:
            scheduler.blocks.take_log()
            return
        if scheduler.needs_full_write:
            scheduler.needs_full_write = False
            self.stale = True
            self._last_seed_try = 0.0
        ops = scheduler.blocks.take_log()
        if self.stale:
            now = time.monotonic()
            if now - self._last_seed_try < RESEED_INTERVAL:
                return  # the next whole write covers this log
            self._last_seed_try = now
            # The whole state as of now; logs from here on are applied on top of it (if this
            # write fails, they are skipped and the next whole write covers them).
            self.stale = False
            job = (self._seed, scheduler.blocks.snapshot(), scheduler.stored_states(), scheduler.epoch)
        elif len(ops):
            ops.load = scheduler.load_record()
            job = (self._apply, ops, scheduler.blocks.counts())
        else:
            return
        self._inflight = asyncio.ensure_future(self._run(job))

    async def _run(self, job: tuple) -> None:
        fn, *args = job
        if self.stale and fn == self._apply:
            return  # an earlier write failed: the next whole write covers this one
        try:
            await asyncio.to_thread(fn, *args)
            if not self.available:
                log.info("the replica answers again")
            self.available = True
        except Fenced as err:
            self.fenced = f"another scheduler took over pool writes: {err.message}"
            log.error("stopping: %s", self.fenced)
        except Exception as err:  # Redis down, a timeout: keep serving from our own view
            if self.available:
                log.warning("replica write failed (%s); serving from the scheduler's own view", err)
            self.available = False
            self.stale = True

    def _apply(self, ops: StepOps, expected: PoolCounts) -> None:
        token = self.lease.token if self.lease is not None else 0
        try:
            got = self.replica.apply(ops, token).counts
        except Fenced:
            if self.lease is not None:
                # Did we take the lease again meanwhile (it had lapsed, e.g. while this process was
                # stopped)? Then this write's token is our own old one, and a whole write follows.
                # The lock waits out a retake under way in the renewer's thread: its new token is
                # in Redis before it is in `lease.token`.
                with self.lease.lock:
                    retaken = self.lease.token > token
                if retaken:
                    self.stale = True
                    return
            raise
        self.num_writes += 1
        if got != expected:
            log.error("replica counts %s differ from the scheduler's %s; rewriting it whole", got, expected)
            self.stale = True

    def _seed(self, snap, states: list[list], epoch: str) -> None:
        if self.lease is not None and not self._reacquire():
            self.stale = True
            return
        self.replica.fence = self.lease.token if self.lease is not None else 0
        self.replica.seed(snap, states, epoch, self.model)
        self.num_full_writes += 1
        self.register()
        log.info("replica rewritten whole: %d blocks, %d sequence states", snap.num_blocks, len(states))

    def register(self) -> None:
        """Announce the pool in the registry (a Redis replica only)."""
        client = getattr(self.replica, "client", None)
        if self.registration is not None and client is not None:
            from pagedserve.common.pool_registry import register

            register(client, self.replica.pool_id, **self.registration)

    @property
    def idle(self) -> bool:
        """No write in flight, and the replica is not waiting for a whole one."""
        return not self.stale and (self._inflight is None or self._inflight.done())

    async def flush(self) -> None:
        """Wait until every write shipped so far has landed (or failed)."""
        while self._inflight is not None and not self._inflight.done():
            await asyncio.shield(self._inflight)

    # --- the lease -------------------------------------------------------------------------

    def start_renewing(self) -> None:
        if self.lease is not None and self._renewer is None:
            self._renewer = asyncio.create_task(self._renew_forever(), name="scheduler-lease")

    async def _renew_forever(self) -> None:
        lease = self.lease
        assert lease is not None
        while not self.fenced:
            await asyncio.sleep(lease.renew_interval)
            try:
                held = await asyncio.to_thread(lease.renew)
                if not held:
                    # Our key is gone: Redis lost its data (take it again and rewrite the
                    # replica), or another scheduler holds it now (stop).
                    if await asyncio.to_thread(self._reacquire):
                        self.stale = True
                        self.wake()
                self.available = True
            except Fenced as err:
                self.fenced = err.message
            except Exception as err:
                if self.available:
                    log.warning("cannot renew the lease: %s", err)
                self.available = False

    def _reacquire(self) -> bool:
        """Keep or take the lease again (worker thread). The renewer and a whole write may both
        call this at once: the lease's lock makes the second one find the lease already renewed."""
        assert self.lease is not None
        with self.lease.lock:
            if self.lease.renew():
                return True
            if self.lease.acquire() > 0:
                self.fenced = "another scheduler holds the lease of this pool"
                log.error("stopping: %s", self.fenced)
                return False
            log.warning("lease taken again with fencing token %d", self.lease.token)
            return True

    async def close(self) -> None:
        """Stop renewing; once every write has landed, give the lease up for a standby."""
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        with contextlib.suppress(Exception):
            await self.flush()
        if self.lease is not None and not self.fenced:
            await asyncio.to_thread(self.lease.release)
