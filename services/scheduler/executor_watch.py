"""Part of `SchedulerEngine` (engine.py): what the step loop does when the executor is in trouble.

An executor that could not be reached, or refused a step, with the same epoch may have lost
track of our sequences: `forget_executor_state` re-sends them whole on the next step. A changed
epoch means the pool is gone: `Scheduler.reset_pool` drops every block and re-queues the running
sequences for recompute. Past `stall_timeout` unreachable, every in-flight stream fails with
UNAVAILABLE rather than go silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from pagedserve.common.errors import Unavailable
from pagedserve.common.step import ExecutorClient, ExecutorInfo

if TYPE_CHECKING:
    from pagedserve.scheduler.engine import SchedulerEngine

log = logging.getLogger(__name__)

MAX_RETRY_DELAY = 2.0


async def wait_for_info(
    executor: ExecutorClient, *, delay: float = 0.2, timeout: float | None = None
) -> ExecutorInfo:
    """The executor's Info, retried (with backoff) while it is unreachable."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            return await executor.info()
        except Unavailable as err:
            if deadline is not None and time.monotonic() > deadline:
                raise
            log.info("waiting for the executor: %s", err.message)
        await asyncio.sleep(delay)
        delay = min(delay * 2, MAX_RETRY_DELAY)


class ExecutorWatchMixin:
    def _executor_lost(self: SchedulerEngine) -> None:
        if self.executor_down_since is None:
            self.executor_down_since = time.monotonic()
            self._notify(False)
        self.scheduler.forget_executor_state()

    async def _probe_executor(self: SchedulerEngine) -> None:
        """While the executor is down: retry its Info; past the stall timeout, fail every
        in-flight request (UNAVAILABLE) rather than leave its stream silent."""
        try:
            info = await self.executor.info()
        except Unavailable as err:
            down = time.monotonic() - (self.executor_down_since or time.monotonic())
            if down > self.stall_timeout and self.scheduler.requests:
                log.error(
                    "executor unreachable for %.0f s: failing %d request(s)",
                    down,
                    len(self.scheduler.requests),
                )
                self.scheduler.fail_all(
                    Unavailable(f"the executor is unreachable ({err.message}) for {down:.0f} s")
                )
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=0.5)
            return
        log.info("executor is back (epoch %s)", info.epoch)
        self.executor_down_since = None
        self._apply_info(info)
        self._notify(self.serving)

    async def _recover(self: SchedulerEngine) -> None:
        self._apply_info(await wait_for_info(self.executor, timeout=self.stall_timeout))

    def _apply_info(self: SchedulerEngine, info: ExecutorInfo) -> None:
        if info.epoch == self.scheduler.epoch:
            self.scheduler.forget_executor_state()
            return
        if (info.num_blocks, info.block_size) != (self.info.num_blocks, self.info.block_size):
            log.error(
                "the executor came back with a different pool (%d x %d, was %d x %d); "
                "restart the scheduler to use it",
                info.num_blocks,
                info.block_size,
                self.info.num_blocks,
                self.info.block_size,
            )
        self.info = info
        # The swap space may differ (another --swap-space): the reset below sizes it anew.
        self.scheduler.blocks.num_cpu_blocks = info.num_cpu_blocks
        log.warning("executor pool lost (new epoch %s): recomputing running requests", info.epoch)
        self.scheduler.reset_pool(info.epoch)
