"""The Executor gRPC service: protobuf in, the engine's step, protobuf out.

A short step runs on the event loop itself: fewer than `INLINE_STEP_TOKENS` tokens (a decode
batch, a short prefill) while the last few steps each took under `INLINE_STEP_SECONDS`. Handing
such a step to a worker thread and waking the loop when it ends put a thread switch between every
two steps (the stack's mixed trace on the bundled model ran about 10% longer that way,
docs/EXECUTOR_BENCH.md). Any other step runs in a worker thread, so that the loop keeps answering
health checks and Info meanwhile (a slow model's decode steps too: the first steps, and any after
a slow one, go to the thread); the engine serializes steps itself. `PAGEDSERVE_INLINE_STEPS=0`
sends every step to the thread.

That worker is always the same one thread, which also runs the start-up warm-up
(`ExecutorEngine.warm_up`): glibc's malloc gives each thread an arena of its own, so the memory a
heavy step's activations take is warm only for later steps on the same thread. With asyncio's
shared pool a step could land on a thread whose arena had never grown, and page-fault every
activation in again (the served mixed trace's first 2,048-token step: about 14,000 faults and
1.5-2x its later time).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc

from pagedserve.common.errors import PagedServeError
from pagedserve.common.grpc_utils import grpc_errors
from pagedserve.common.step import StepInput, info_to_proto, output_to_proto, step_from_proto
from pagedserve.common.switches import switched_on
from pagedserve.executor.engine import ExecutorEngine
from pagedserve.executor.placement import PREFILL_STEP_TOKENS
from pagedserve.v1 import executor_pb2, executor_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "pagedserve.v1.Executor"
INLINE_SWITCH = "PAGEDSERVE_INLINE_STEPS"
INLINE_STEP_TOKENS = PREFILL_STEP_TOKENS  # a step this long or longer runs in a worker thread
INLINE_STEP_SECONDS = 0.1  # ... and any step while a recent one took this long or longer


class ExecutorServicer(executor_pb2_grpc.ExecutorServicer):
    def __init__(self, engine: ExecutorEngine) -> None:
        self.engine = engine
        self.inline = switched_on(INLINE_SWITCH)
        self._recent: collections.deque[float] = collections.deque(maxlen=4)  # seconds of the last steps
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="executor-step")

    def close(self) -> None:
        """Ends the step thread once its current step (if any) is done; later steps are refused."""
        self._thread.shutdown(wait=False, cancel_futures=True)

    async def _on_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def warm_up(self) -> None:
        """The engine's start-up warm-up (when it has one), on the step thread."""
        tokens = self.engine.warm_up_tokens
        if tokens:
            seconds = await self._on_thread(self.engine.warm_up, tokens)
            log.info("warmed up with a %d-token step in %.2f s", tokens, seconds)

    def _runs_inline(self, step: StepInput) -> bool:
        return (
            self.inline
            and step.total_num_scheduled_tokens < INLINE_STEP_TOKENS
            and len(self._recent) == self._recent.maxlen
            and max(self._recent) < INLINE_STEP_SECONDS
        )

    @grpc_errors
    async def Info(
        self, request: executor_pb2.ExecutorInfoRequest, context
    ) -> executor_pb2.ExecutorInfoResponse:
        return info_to_proto(self.engine.info())

    @grpc_errors
    async def ExecuteStep(
        self, request: executor_pb2.ExecuteStepRequest, context
    ) -> executor_pb2.ExecuteStepResponse:
        step, claimed_total = step_from_proto(request)
        try:
            if self._runs_inline(step):
                output = self.engine.execute_step(step, claimed_total)
            else:
                output = await self._on_thread(self.engine.execute_step, step, claimed_total)
            self._recent.append(output.execute_seconds)
        except PagedServeError:
            raise  # a malformed step or an epoch mismatch: grpc_errors maps it
        except Exception as e:
            # A fault in the forward itself (e.g. out of memory); request states are untouched.
            log.exception("step %d failed", step.step_id)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"step {step.step_id} failed in the executor: {e!r}"
            )
        return output_to_proto(output)
