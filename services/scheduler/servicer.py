"""The Scheduler gRPC service: protobuf in, the engine's calls, protobuf out.

Submit streams one request's `RequestDelta`s; Connect carries all of a gateway's requests on
one stream (see streams.py). The step loop never waits for this stream: a
client that reads slowly gets fewer, bigger messages. When the client goes away (cancels,
disconnects) before the last message, the request is aborted and its blocks are freed at the
next step boundary.
"""

from __future__ import annotations

import asyncio
import logging

from pagedserve.common.errors import Unavailable
from pagedserve.common.grpc_utils import grpc_errors
from pagedserve.common.stats import SchedulerStats
from pagedserve.scheduler.engine import SchedulerEngine
from pagedserve.scheduler.streams import ConnectSession, delta_to_proto, open_request
from pagedserve.v1 import scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "pagedserve.v1.Scheduler"


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, engine: SchedulerEngine | None, pool_id: str = "") -> None:
        self.engine = engine  # None while a standby waits for the pool's lease
        self.pool_id = pool_id

    def _engine(self) -> SchedulerEngine:
        if self.engine is None:
            raise Unavailable(
                f"this scheduler is a standby for pool {self.pool_id!r}: another one holds its lease"
            )
        return self.engine

    @grpc_errors
    async def Submit(self, request: scheduler_pb2.SubmitRequest, context):
        engine = self._engine()
        stream = open_request(engine, request)
        finished = False
        try:
            while not finished:
                delta = await stream.get()
                finished = delta.finished
                yield delta_to_proto(delta)
        finally:
            if not finished:  # the client went away (or the call was cancelled)
                log.info("request %s: client gone, aborting", request.request_id)
                engine.abort(request.request_id)

    @grpc_errors
    async def Connect(self, request_iterator, context):
        session = ConnectSession(self._engine())
        reader = asyncio.ensure_future(session.read(request_iterator))
        try:
            async for msg in session.messages(reader):
                yield msg
        finally:
            reader.cancel()
            session.close()

    @grpc_errors
    async def Abort(self, request: scheduler_pb2.AbortRequest, context) -> scheduler_pb2.AbortResponse:
        return scheduler_pb2.AbortResponse(found=self._engine().abort(request.request_id))

    @grpc_errors
    async def Stats(self, request: scheduler_pb2.StatsRequest, context) -> scheduler_pb2.StatsResponse:
        engine = self._engine()
        sched = engine.scheduler
        stats, counts, limits = sched.stats, sched.blocks.counts(), sched.limits
        return SchedulerStats(
            blocks_total=counts.num_total,
            blocks_used=counts.num_used,
            blocks_cached=counts.num_cached,
            blocks_free=counts.num_free,
            requests_running=len(sched.running),
            requests_waiting=len(sched.waiting) + sched.num_swapped_seqs,
            preemptions_total=stats.num_preemptions,
            prefix_cache_hit_tokens=stats.prefix_hit_tokens,
            prefix_cache_query_tokens=stats.prefix_query_tokens,
            generated_tokens_total=stats.generated_tokens,
            steps_total=stats.num_steps,
            block_size=limits.block_size,
            max_model_len=limits.max_model_len,
            model=limits.model,
            kv_utilization=stats.kv_utilization,
            eos_token_ids=sorted(limits.eos_token_ids),
            vocab_size=limits.vocab_size,
            serving=engine.serving,
            resumed_total=stats.num_resumed,
            pool_id=self.pool_id,
            blocks_digest=engine.blocks_digest() if request.with_digest else "",
            cpu_blocks_total=sched.blocks.num_cpu_blocks,
            swapped_blocks=sched.num_swapped_blocks,
            swap_out_blocks_total=stats.swap_out_blocks,
            swap_in_blocks_total=stats.swap_in_blocks,
        ).to_proto()
