"""`pagedserve scheduler`: wait for the executor, make its pool in Redis, serve `pagedserve.v1.Scheduler`."""

from __future__ import annotations

import argparse
import asyncio
import logging
from dataclasses import dataclass

from pagedserve.common.grpc_utils import GrpcServer, run_until_signal
from pagedserve.common.logs import setup_logging
from pagedserve.common.step import ExecutorClient
from pagedserve.scheduler.block_pool import BlockPool
from pagedserve.scheduler.config import SchedulerConfig
from pagedserve.scheduler.engine import SchedulerEngine
from pagedserve.scheduler.redis_keys import pool_id_for
from pagedserve.scheduler.servicer import SERVICE_NAME, SchedulerServicer
from pagedserve.v1 import scheduler_pb2_grpc

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=50053)
    parser.add_argument("--executor", default="localhost:50054", help="executor address (host:port)")
    parser.add_argument(
        "--redis-url", required=True, help="Redis for the KV accounting, e.g. redis://localhost:6379/0"
    )
    parser.add_argument("--pool-id", default="", help="the pool's key namespace (default: from --executor)")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one step")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="most tokens in one step")
    parser.add_argument(
        "--max-queued-requests",
        type=int,
        default=1024,
        help="requests waiting beyond this are refused with RESOURCE_EXHAUSTED",
    )
    parser.add_argument(
        "--max-model-len", type=int, default=None, help="longest prompt + output (default: the executor's)"
    )


def config_from_args(args: argparse.Namespace) -> SchedulerConfig:
    config = SchedulerConfig(
        redis_url=args.redis_url,
        host=args.host,
        port=args.port,
        executor=args.executor,
        pool_id=args.pool_id or pool_id_for(args.executor),
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_queued_requests=args.max_queued_requests,
        max_model_len=args.max_model_len,
    )
    for name in ("max_num_seqs", "max_num_batched_tokens", "max_queued_requests"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if config.max_model_len is not None and config.max_model_len < 1:
        raise ValueError(f"--max-model-len must be >= 1, got {config.max_model_len}")
    return config


@dataclass
class RunningScheduler:
    server: GrpcServer
    engine: SchedulerEngine

    @property
    def port(self) -> int:
        return self.server.bound_port

    async def stop(self) -> None:
        await self.server.stop(grace=1.0)
        await self.engine.stop()
        await self.engine.executor.close()
        self.engine.scheduler.pool.close()


async def start(
    config: SchedulerConfig, executor: ExecutorClient, pool: BlockPool, *, info_timeout: float | None = None
) -> RunningScheduler:
    """Connect to the executor (waiting for it), make the pool match it, start the loop and serve."""
    engine = await SchedulerEngine.connect(
        executor,
        pool,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_queued_requests=config.max_queued_requests,
        max_model_len=config.max_model_len,
        info_timeout=info_timeout,
    )
    engine.start()
    server = GrpcServer(config.host, config.port)
    server.add(scheduler_pb2_grpc.add_SchedulerServicer_to_server, SchedulerServicer(engine), SERVICE_NAME)
    await server.start()
    return RunningScheduler(server, engine)


async def serve(config: SchedulerConfig) -> None:
    from pagedserve.executor.client import GrpcExecutorClient
    from pagedserve.scheduler.redis_pool import RedisBlockPool

    pool = RedisBlockPool.from_url(config.redis_url, config.pool_id)
    running = await start(config, GrpcExecutorClient(config.executor), pool)
    limits = running.engine.scheduler.limits
    log.info(
        "scheduler serving on %s:%d; executor %s, pool %r (%d blocks x %d tokens), max_model_len %d",
        config.host,
        running.port,
        config.executor,
        config.pool_id,
        limits.num_blocks,
        limits.block_size,
        limits.max_model_len,
    )
    await run_until_signal(running.stop)


def main(args: argparse.Namespace) -> int:
    setup_logging("scheduler")
    try:
        config = config_from_args(args)
    except ValueError as e:
        log.error("%s", e)
        return 2
    import redis

    try:
        asyncio.run(serve(config))
    except redis.exceptions.ConnectionError as e:
        log.error("cannot reach Redis at %s: %s", config.redis_url, e)
        return 1
    return 0
