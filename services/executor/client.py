"""Ways for a scheduler to reach an executor, both implementing `common.step.ExecutorClient`."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc

from pagedserve.common import internal_tls
from pagedserve.common.grpc_utils import CLIENT_CHANNEL_OPTIONS, error_from_rpc
from pagedserve.common.step import (
    ExecutorInfo,
    StepInput,
    StepOutput,
    info_from_proto,
    output_from_proto,
    step_to_proto,
)
from pagedserve.executor.engine import ExecutorEngine
from pagedserve.v1 import executor_pb2, executor_pb2_grpc


class GrpcExecutorClient:
    """An executor over gRPC. Errors come back as `PagedServeError`s (FAILED_PRECONDITION as
    `FailedPrecondition`, INVALID_ARGUMENT as `InvalidArgument`, unreachable as `Unavailable`)."""

    def __init__(self, address: str, *, timeout: float | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = internal_tls.aio_channel(address, CLIENT_CHANNEL_OPTIONS)
        self._stub = executor_pb2_grpc.ExecutorStub(self._channel)

    async def info(self) -> ExecutorInfo:
        try:
            reply = await self._stub.Info(executor_pb2.ExecutorInfoRequest(), timeout=self.timeout)
        except grpc.RpcError as e:
            raise error_from_rpc(e, f"executor at {self.address}") from e
        return info_from_proto(reply)

    async def execute_step(self, step: StepInput) -> StepOutput:
        try:
            reply = await self._stub.ExecuteStep(step_to_proto(step), timeout=self.timeout)
        except grpc.RpcError as e:
            raise error_from_rpc(e, f"executor at {self.address}") from e
        return output_from_proto(reply)

    async def close(self) -> None:
        await self._channel.close()


class InProcessExecutorClient:
    """An engine in this process (tests, single-process runs); steps run in one worker thread, in
    the order they were sent (the scheduler may send a step while the one before it runs)."""

    def __init__(self, engine: ExecutorEngine) -> None:
        self.engine = engine
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="in-process-step")

    async def info(self) -> ExecutorInfo:
        return self.engine.info()

    async def execute_step(self, step: StepInput) -> StepOutput:
        return await asyncio.get_running_loop().run_in_executor(self._thread, self.engine.execute_step, step)

    async def close(self) -> None:
        self._thread.shutdown(wait=False)
