"""The Executor gRPC service: protobuf in, the engine's step in a worker thread, protobuf out.

The step runs in a thread so that the event loop keeps answering health checks and Info while a
long forward is in flight; the engine serializes steps itself.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from pagedserve.common.errors import PagedServeError
from pagedserve.common.grpc_utils import grpc_errors
from pagedserve.common.step import info_to_proto, output_to_proto, step_from_proto
from pagedserve.executor.engine import ExecutorEngine
from pagedserve.v1 import executor_pb2, executor_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "pagedserve.v1.Executor"


class ExecutorServicer(executor_pb2_grpc.ExecutorServicer):
    def __init__(self, engine: ExecutorEngine) -> None:
        self.engine = engine

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
            output = await asyncio.to_thread(self.engine.execute_step, step, claimed_total)
        except PagedServeError:
            raise  # a malformed step or an epoch mismatch: grpc_errors maps it
        except Exception as e:
            # A fault in the forward itself (e.g. out of memory); request states are untouched.
            log.exception("step %d failed", step.step_id)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"step {step.step_id} failed in the executor: {e!r}"
            )
        return output_to_proto(output)
