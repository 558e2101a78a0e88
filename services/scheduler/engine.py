"""The step loop: schedule -> (replica write | executor call, concurrently) -> update.

It runs as one background task. Clients never block it: a request's tokens go into its
`RequestStream`, which the client side drains at its own pace. The replica write is
write-behind (replication.py); the executor never waits on Redis. Executor trouble is
handled here, at the loop, so the policy only sees two events:
- a changed epoch (FailedPrecondition, or a reply from a different epoch): the pool is gone,
  `Scheduler.reset_pool` drops every block and re-queues the running sequences for recompute;
- an executor that was unreachable, or refused a step, with the same epoch: it may have lost
  track of our sequences, so `forget_executor_state` re-sends them whole on the next step.
An executor unreachable for longer than `stall_timeout` fails every in-flight stream with
UNAVAILABLE (never a silent freeze), and new requests are refused until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from pagedserve.common.errors import FailedPrecondition, Fenced, InvalidArgument, Unavailable
from pagedserve.common.params import SamplingParams
from pagedserve.common.step import ExecutorClient, ExecutorInfo, StepOutput
from pagedserve.common.switches import switched_on
from pagedserve.scheduler.block_pool import BlockPool
from pagedserve.scheduler.config import SchedulerLimits
from pagedserve.scheduler.executor_watch import ExecutorWatchMixin, wait_for_info
from pagedserve.scheduler.lease import Lease
from pagedserve.scheduler.output import RequestStream
from pagedserve.scheduler.recovery import ChoiceProgress
from pagedserve.scheduler.replication import Replicator
from pagedserve.scheduler.scheduler import ScheduledStep, Scheduler
from pagedserve.scheduler.swap import DEFAULT_SWAP_MIN_TOKENS

# A step of at least this many tokens (a prefill) runs long enough that requests arriving
# meanwhile should join the step after it, not the one after that: the next step is then planned
# when it returns, not while it runs (`step_ahead`).
LATE_PLAN_TOKENS = 128
# PAGEDSERVE_SEND_EARLY=0: step k + 1 is sent only once step k has returned (see step_ahead).
SEND_EARLY_SWITCH = "PAGEDSERVE_SEND_EARLY"

log = logging.getLogger(__name__)


def _discard(call: asyncio.Future) -> None:
    """A step sent after one that failed: its result (or error) is of no use."""
    if not call.cancelled():
        call.exception()


class SchedulerEngine(ExecutorWatchMixin):
    """Owns the `Scheduler`, the executor client, the replicator and the loop task."""

    def __init__(
        self,
        scheduler: Scheduler,
        executor: ExecutorClient,
        info: ExecutorInfo,
        replicator: Replicator,
        *,
        stall_timeout: float = 30.0,
        attach_timeout: float = 30.0,
    ) -> None:
        self.scheduler = scheduler
        self.executor = executor
        self.info = info
        self.replicator = replicator
        self.stall_timeout = stall_timeout
        self.attach_timeout = attach_timeout
        self.on_health: Callable[[bool], object] | None = None  # told when serving starts or stops
        self._wake = asyncio.Event()  # replaced in start(): an Event belongs to one event loop
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._last_step_failed = False
        self._started_at = time.monotonic()
        self.executor_down_since: float | None = None
        self.plan_ahead = True  # plan step k + 1 while step k runs (step_ahead)
        self.send_early = switched_on(SEND_EARLY_SWITCH)  # ... and send it before k returns
        self._in_flight: tuple[ScheduledStep, asyncio.Future] | None = None
        self.control_seconds = 0.0  # scheduling time of the last step on its critical path

    @property
    def pool(self) -> BlockPool:
        return self.replicator.replica

    @classmethod
    async def connect(
        cls,
        executor: ExecutorClient,
        pool: BlockPool,
        *,
        lease: Lease | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        max_queued_requests: int = 1024,
        max_model_len: int | None = None,
        info_timeout: float | None = None,
        stall_timeout: float = 30.0,
        attach_timeout: float = 30.0,
        preemption_mode: str = "auto",
        swap_min_tokens: int = DEFAULT_SWAP_MIN_TOKENS,
    ) -> SchedulerEngine:
        """Wait for the executor's Info, take the pool over from its replica (blocks and
        in-flight requests), and build the scheduler. With a lease, hold it first."""
        info = await wait_for_info(executor, timeout=info_timeout)
        limits = SchedulerLimits.from_info(
            info,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_queued_requests=max_queued_requests,
            max_model_len=max_model_len,
            preemption_mode=preemption_mode,
            swap_min_tokens=swap_min_tokens,
        )
        if lease is not None:
            pool.fence = lease.token
        kept = await asyncio.to_thread(
            pool.init, info.num_blocks, info.block_size, info.epoch, info.model, info.num_cpu_blocks
        )
        snap, stored = await asyncio.to_thread(lambda: (pool.snapshot(), pool.load_requests()))
        scheduler = Scheduler(limits, info.epoch)
        resumed = scheduler.take_over(snap, stored)
        # The executor may still hold the previous scheduler's sequences (some of them under ids
        # Redis never heard of, when their state write was lost with that scheduler).
        scheduler.forget_all = True
        log.info(
            "pool ready: %d blocks of %d tokens, epoch %s (%s); %d in-flight request(s) to resume",
            info.num_blocks,
            info.block_size,
            info.epoch,
            "prefix cache kept" if kept else "reset",
            resumed,
        )
        replicator = Replicator(pool, lease, model=info.model)
        scheduler.fence = lease.token if lease is not None else 0
        return cls(
            scheduler, executor, info, replicator, stall_timeout=stall_timeout, attach_timeout=attach_timeout
        )

    # --- requests ----------------------------------------------------------------------

    def _check_serving(self) -> None:
        if self.replicator.fenced:
            raise Unavailable(f"this scheduler no longer serves its pool: {self.replicator.fenced}")
        if self.executor_down_since is not None and time.monotonic() - self.executor_down_since > 1.0:
            raise Unavailable(
                f"the executor is unreachable (for {time.monotonic() - self.executor_down_since:.0f} s)"
            )

    def submit(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams, priority: int = 0
    ) -> RequestStream:
        self._check_serving()
        stream = self.scheduler.add_request(request_id, prompt_token_ids, sampling, priority)
        self._wake.set()
        return stream

    def attach(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        priority: int,
        progress: list[ChoiceProgress],
    ) -> RequestStream:
        """Re-attach a client to a request it started on another scheduler (see recovery.py)."""
        self._check_serving()
        stream = self.scheduler.attach(request_id, prompt_token_ids, sampling, priority, progress)
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> bool:
        found = self.scheduler.abort(request_id)
        if found:
            self._wake.set()
        return found

    @property
    def serving(self) -> bool:
        """Whether requests can make progress: the pool is ours, the executor and replica answer."""
        return not self.replicator.fenced and self.executor_down_since is None and self.replicator.available

    def blocks_digest(self) -> str:
        """The digest of this scheduler's block accounting once the replica has all of it;
        "" while a write is pending or in flight."""
        if len(self.scheduler.blocks.log) or not self.replicator.idle:
            return ""
        return self.scheduler.blocks.snapshot().digest()

    # --- the loop ----------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._wake = asyncio.Event()
            self._started_at = time.monotonic()
            self.replicator.wake = self._wake.set
            self.replicator.start_renewing()
            self._task = asyncio.create_task(self.run(), name="scheduler-step-loop")

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop at the next step boundary (a step in flight finishes and is taken in first),
        let the last replica write land, and give the lease up."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self._task = None
        if self._in_flight is not None:  # the step already sent: take its tokens in
            scheduled, call = self._in_flight
            self._in_flight = None
            with contextlib.suppress(Exception):
                output = await asyncio.wait_for(self._receive(scheduled, call), timeout)
                if output is not None:
                    self.scheduler.update(scheduled, output)
        self.scheduler.publish()
        await self.replicator.ship(self.scheduler, final=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.replicator.close(), timeout)

    async def run(self) -> None:
        while not self._stopping:
            if self.replicator.fenced:
                self.scheduler.fail_all(Unavailable(f"scheduler stopped: {self.replicator.fenced}"))
                self._notify(False)
                return
            self._expire_detached()
            if self.executor_down_since is not None:
                await self._probe_executor()
                continue
            if not self.scheduler.has_work() and self._in_flight is None:
                if self.replicator.stale and not self.replicator.fenced:
                    await self.replicator.ship(self.scheduler)  # a whole write, when it is due
                self._wake.clear()
                timeout = 1.0 if self.scheduler.detached or self.replicator.stale else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=timeout)
                continue
            try:
                ran = await (self.step_ahead() if self.plan_ahead else self.step())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scheduler step failed")  # a bug must not kill the loop
                await asyncio.sleep(0.5)
                continue
            if not ran:
                # Work exists but nothing could run (e.g. only replica writes): wait a little for news.
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=0.01)
            else:
                await asyncio.sleep(0)  # let the servicers run between steps

    async def step(self) -> bool:
        """One step, planned, run and taken in before returning; whether the executor ran one.
        (The loop runs `step_ahead`; this is the plain form, for tests and benchmarks.)"""
        self._follow_lease()
        t0 = time.perf_counter()
        scheduled = self.scheduler.schedule()
        await self.replicator.ship(self.scheduler)
        self.control_seconds = time.perf_counter() - t0
        if scheduled.step_input is None:
            self.scheduler.publish()
            return False
        call = self._send(scheduled)
        await asyncio.sleep(0)  # the call is on its way ...
        self.scheduler.publish()  # ... while the last step's tokens go to their streams
        output = await self._receive(scheduled, call)
        if output is None:
            return True
        t1 = time.perf_counter()
        self.scheduler.update(scheduled, output)
        self.control_seconds += time.perf_counter() - t1
        return True

    async def step_ahead(self) -> bool:
        """One step of the loop with the next step planned while the executor runs this one
        (vLLM's async scheduling): when its output arrives the next step is sent at once, and
        the output is taken in while that one runs. The executor appends the tokens it samples
        itself, so a decode step needs no token values; a sequence that stopped meanwhile
        computes one token too many, which is dropped. After a long step (LATE_PLAN_TOKENS) the
        next is planned when it returns instead. Whether the executor ran a step."""
        self._follow_lease()
        if self._in_flight is None:
            scheduled = self.scheduler.schedule()
            await self.replicator.ship(self.scheduler)
            if scheduled.step_input is None:
                self.scheduler.publish()
                return False
            self._in_flight = (scheduled, self._send(scheduled))
            await asyncio.sleep(0)  # the call is on its way before the planning below
        scheduled, call = self._in_flight
        self._in_flight = None
        if scheduled.step_input.total_num_scheduled_tokens >= LATE_PLAN_TOKENS:
            # planned once it returns (the next call), with the requests that came while it ran
            output = await self._receive(scheduled, call)
            if output is not None:
                self.scheduler.update(scheduled, output)
                self.scheduler.publish()
            return True
        planned = self.scheduler.schedule()  # step k + 1, while step k runs
        await self.replicator.ship(self.scheduler)
        early = None
        if planned.step_input is not None and self.send_early:
            early = self._send(planned)  # queued behind step k at the executor
        output = await self._receive(scheduled, call)
        if output is None:  # the pool was reset: the plan counted on step k
            if early is not None:
                early.add_done_callback(_discard)
            return True
        t0 = time.perf_counter()
        if planned.step_input is not None:
            self._in_flight = (planned, early or self._send(planned))
            await asyncio.sleep(0)  # on its way before step k's output is taken in
        self.control_seconds = time.perf_counter() - t0  # all that stands between two steps
        self.scheduler.update(scheduled, output)
        self.scheduler.publish()
        return True

    def _follow_lease(self) -> None:
        """Steps carry the lease's current fencing token (it grows when the lease is taken again)."""
        lease = self.replicator.lease
        if lease is not None:
            self.scheduler.fence = lease.token

    def _send(self, scheduled: ScheduledStep) -> asyncio.Future:
        return asyncio.ensure_future(self.executor.execute_step(scheduled.step_input))

    async def _receive(self, scheduled: ScheduledStep, call: asyncio.Future) -> StepOutput | None:
        """The step's output, or None when it failed (the pool is then reset: every running
        sequence is recomputed, the executor told to forget them)."""
        try:
            output = await call
        except Fenced as err:
            self.replicator.fenced = f"the executor refused this scheduler's steps: {err.message}"
            log.error("stopping: %s", self.replicator.fenced)
            return None
        except FailedPrecondition as err:
            log.warning("executor epoch changed: %s", err.message)
            await self._recover()
            return None
        except Unavailable as err:
            log.warning("executor unreachable: %s", err.message)
            self._executor_lost()
            return None
        except InvalidArgument as err:
            # A step the executor finds malformed means we and it disagree; start over once,
            # and abort the step's requests if it happens again right away.
            log.error("executor refused step %d: %s", scheduled.step_input.step_id, err.message)
            if self._last_step_failed:
                for seq, _ in scheduled.seqs:
                    self.scheduler.abort(seq.request.request_id)
            self._last_step_failed = True
            self.scheduler.forget_executor_state()
            return None
        self._last_step_failed = False
        if output.epoch and output.epoch != self.scheduler.epoch:
            log.warning("executor replied from epoch %s, expected %s", output.epoch, self.scheduler.epoch)
            await self._recover()
            return None
        return output

    def _expire_detached(self) -> None:
        sched = self.scheduler
        if sched.detached and time.monotonic() - self._started_at > self.attach_timeout:
            sched.expire_detached(list(sched.detached))

    def _notify(self, serving: bool) -> None:
        if self.on_health is not None:
            res = self.on_health(serving)
            if asyncio.iscoroutine(res):
                asyncio.ensure_future(res)
