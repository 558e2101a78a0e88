"""The step loop: schedule (one pool round trip) -> execute (one executor call) -> update.

It runs as one background task. Clients never block it: a request's tokens go into its
`RequestStream`, which the client side drains at its own pace. Executor trouble is handled
here, at the loop, so the policy only sees two events:
- a changed epoch (FailedPrecondition, or a reply from a different epoch): the pool is gone,
  `Scheduler.reset_pool` drops every block and re-queues the running sequences for recompute;
- an executor that was unreachable, or refused a step, with the same epoch: it may have lost
  track of our sequences, so `forget_executor_state` re-sends them whole on the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from pagedserve.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from pagedserve.common.params import SamplingParams
from pagedserve.common.step import ExecutorClient, ExecutorInfo
from pagedserve.scheduler.block_pool import BlockPool
from pagedserve.scheduler.config import SchedulerLimits
from pagedserve.scheduler.output import RequestStream
from pagedserve.scheduler.scheduler import Scheduler

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


class SchedulerEngine:
    """Owns the `Scheduler`, the executor client and the loop task."""

    def __init__(self, scheduler: Scheduler, executor: ExecutorClient, info: ExecutorInfo) -> None:
        self.scheduler = scheduler
        self.executor = executor
        self.info = info
        self._wake = asyncio.Event()  # replaced in start(): an Event belongs to one event loop
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._last_step_failed = False
        self.control_seconds = 0.0  # scheduling + pool time of the last step (executor excluded)

    @classmethod
    async def connect(
        cls,
        executor: ExecutorClient,
        pool: BlockPool,
        *,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        max_queued_requests: int = 1024,
        max_model_len: int | None = None,
        info_timeout: float | None = None,
    ) -> SchedulerEngine:
        """Wait for the executor's Info, make the pool match it, and build the scheduler."""
        info = await wait_for_info(executor, timeout=info_timeout)
        limits = SchedulerLimits.from_info(
            info,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_queued_requests=max_queued_requests,
            max_model_len=max_model_len,
        )
        kept = pool.init(info.num_blocks, info.block_size, info.epoch, info.model)
        log.info(
            "pool ready: %d blocks of %d tokens, epoch %s (%s)",
            info.num_blocks,
            info.block_size,
            info.epoch,
            "prefix cache kept" if kept else "reset",
        )
        return cls(Scheduler(limits, pool, info.epoch), executor, info)

    # --- requests ----------------------------------------------------------------------

    def submit(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams, priority: int = 0
    ) -> RequestStream:
        stream = self.scheduler.add_request(request_id, prompt_token_ids, sampling, priority)
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> bool:
        found = self.scheduler.abort(request_id)
        if found:
            self._wake.set()
        return found

    # --- the loop ----------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self.run(), name="scheduler-step-loop")

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop at the next step boundary (a step in flight finishes and is taken in first)."""
        self._stopping = True
        self._wake.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None

    async def run(self) -> None:
        while not self._stopping:
            if not self.scheduler.has_work():
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                ran = await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A Redis outage or a bug must not kill the loop; the next step retries.
                log.exception("scheduler step failed")
                await asyncio.sleep(0.5)
                continue
            if not ran:
                # Work exists but nothing could run (e.g. only pool writes): wait a little for news.
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=0.01)
            else:
                await asyncio.sleep(0)  # let the servicers run between steps

    async def step(self) -> bool:
        """One step; returns whether the executor ran one."""
        t0 = time.perf_counter()
        scheduled = self.scheduler.schedule()
        self.control_seconds = time.perf_counter() - t0
        if scheduled.step_input is None:
            return False
        try:
            output = await self.executor.execute_step(scheduled.step_input)
        except FailedPrecondition as err:
            log.warning("executor epoch changed: %s", err.message)
            await self._recover()
            return True
        except Unavailable as err:
            log.warning("executor unreachable: %s", err.message)
            await self._recover()
            return True
        except InvalidArgument as err:
            # A step the executor finds malformed means we and it disagree; re-send everything
            # once, and abort the step's requests if it happens again right away.
            log.error("executor refused step %d: %s", scheduled.step_input.step_id, err.message)
            if self._last_step_failed:
                for seq, _ in scheduled.seqs:
                    self.scheduler.abort(seq.request.request_id)
            self._last_step_failed = True
            await self._resync()
            return True
        self._last_step_failed = False
        if output.epoch and output.epoch != self.scheduler.epoch:
            log.warning("executor replied from epoch %s, expected %s", output.epoch, self.scheduler.epoch)
            await self._recover()
            return True
        t1 = time.perf_counter()
        self.scheduler.update(scheduled, output)
        self.control_seconds += time.perf_counter() - t1
        return True

    async def _recover(self) -> None:
        info = await wait_for_info(self.executor)
        if info.epoch != self.scheduler.epoch:
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
            log.warning("executor pool lost (new epoch %s): recomputing running requests", info.epoch)
            self.scheduler.reset_pool(info.epoch)
        else:
            await self._resync()

    async def _resync(self) -> None:
        # The next step tells the executor to drop every sequence and re-sends them whole
        # (an executor accepts a new request whose id it holds when the same step finishes it).
        self.scheduler.forget_executor_state()
