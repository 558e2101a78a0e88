"""`pagedserve scheduler`: wait for the executor, make its pool in Redis, serve `pagedserve.v1.Scheduler`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass

from pagedserve.common import event_loop, internal_tls
from pagedserve.common.grpc_utils import GrpcServer, run_until_signal
from pagedserve.common.logs import setup_logging
from pagedserve.common.redis_connect import url_arg
from pagedserve.common.step import ExecutorClient
from pagedserve.scheduler.block_pool import BlockPool
from pagedserve.scheduler.config import SchedulerConfig
from pagedserve.scheduler.engine import SchedulerEngine
from pagedserve.scheduler.lease import Lease
from pagedserve.scheduler.redis_keys import pool_id_for
from pagedserve.scheduler.servicer import SERVICE_NAME, SchedulerServicer
from pagedserve.scheduler.swap import DEFAULT_SWAP_MIN_TOKENS, PreemptionMode
from pagedserve.v1 import scheduler_pb2_grpc

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=50053)
    parser.add_argument("--executor", default="localhost:50054", help="executor address (host:port)")
    parser.add_argument(
        "--redis-url",
        type=url_arg,
        required=True,
        help="Redis for the KV accounting, e.g. redis://localhost:6379/0",
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
    parser.add_argument(
        "--advertise-address",
        default="",
        help="host:port gateways should dial, as written in the pool registry "
        "(default: --host:--port, the host name when --host is a wildcard)",
    )
    parser.add_argument(
        "--lease-ttl",
        type=float,
        default=3.0,
        help="seconds the pool's lease lasts unrenewed; a standby takes over this long after a crash",
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=30.0,
        help="seconds an unreachable executor may stall requests before they fail with UNAVAILABLE",
    )
    parser.add_argument(
        "--preemption-mode",
        choices=[m.value for m in PreemptionMode],
        default="auto",
        help="when blocks run out: recompute, swap to the executor's CPU blocks, or auto (swap n > 1 "
        "groups and sequences of --swap-min-tokens or more, recompute the rest); swap falls back to "
        "recompute when the CPU blocks are short",
    )
    parser.add_argument(
        "--swap-min-tokens",
        type=int,
        default=DEFAULT_SWAP_MIN_TOKENS,
        help="auto preemption: a sequence with this many computed tokens is swapped, not recomputed",
    )
    parser.add_argument(
        "--attach-timeout",
        type=float,
        default=30.0,
        help="seconds a request resumed from Redis waits for its client to re-attach before it is dropped",
    )
    internal_tls.add_arguments(parser)


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
        lease_ttl=args.lease_ttl,
        advertise_address=args.advertise_address,
        stall_timeout=args.stall_timeout,
        attach_timeout=args.attach_timeout,
        preemption_mode=args.preemption_mode,
        swap_min_tokens=args.swap_min_tokens,
    )
    if config.swap_min_tokens < 1:
        raise ValueError(f"--swap-min-tokens must be >= 1, got {config.swap_min_tokens}")
    if config.lease_ttl <= 0 or config.stall_timeout <= 0 or config.attach_timeout <= 0:
        raise ValueError("--lease-ttl, --stall-timeout and --attach-timeout must be > 0")
    for name in ("max_num_seqs", "max_num_batched_tokens", "max_queued_requests"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if config.max_model_len is not None and config.max_model_len < 1:
        raise ValueError(f"--max-model-len must be >= 1, got {config.max_model_len}")
    return config


def advertised(host: str, port: int) -> str:
    """Where others reach a server bound to host:port (a wildcard host: this machine's name)."""
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class RunningScheduler:
    server: GrpcServer
    servicer: SchedulerServicer

    @property
    def engine(self) -> SchedulerEngine:
        assert self.servicer.engine is not None, "a standby has no engine yet"
        return self.servicer.engine

    @property
    def port(self) -> int:
        return self.server.bound_port

    async def stop(self) -> None:
        await self.server.stop(grace=1.0)
        engine = self.servicer.engine
        if engine is not None:
            await engine.stop()
            await engine.executor.close()
            engine.pool.close()


async def serve_pool(
    server: GrpcServer,
    servicer: SchedulerServicer,
    config: SchedulerConfig,
    executor: ExecutorClient,
    pool: BlockPool,
    lease: Lease | None,
    *,
    info_timeout: float | None = None,
) -> SchedulerEngine:
    """Hold the pool's lease (waiting as a standby while another scheduler has it), take the
    pool over, start the loop, and report SERVING. Redis that does not answer yet is waited for."""
    while True:
        try:
            return await _take_pool(server, servicer, config, executor, pool, lease, info_timeout)
        except (ConnectionError, OSError, TimeoutError) as err:
            log.warning("cannot take pool %r yet (%s); retrying", config.pool_id, err)
        except Exception as err:
            if type(err).__module__.split(".")[0] != "redis":
                raise
            log.warning("cannot take pool %r yet (Redis: %s); retrying", config.pool_id, err)
        await asyncio.sleep(1.0)


async def _take_pool(
    server: GrpcServer,
    servicer: SchedulerServicer,
    config: SchedulerConfig,
    executor: ExecutorClient,
    pool: BlockPool,
    lease: Lease | None,
    info_timeout: float | None,
) -> SchedulerEngine:
    if lease is not None:
        while True:
            wait = await asyncio.to_thread(lease.acquire)
            if wait == 0.0:
                break
            log.info("standby for pool %r: the lease is held for %.1f s more", config.pool_id, wait)
            await asyncio.sleep(min(max(wait, 0.05), lease.renew_interval))
        log.info("holding the lease of pool %r (fencing token %d)", config.pool_id, lease.token)
    engine = await SchedulerEngine.connect(
        executor,
        pool,
        lease=lease,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_queued_requests=config.max_queued_requests,
        max_model_len=config.max_model_len,
        info_timeout=info_timeout,
        stall_timeout=config.stall_timeout,
        attach_timeout=config.attach_timeout,
        preemption_mode=config.preemption_mode,
        swap_min_tokens=config.swap_min_tokens,
    )
    if lease is not None:
        engine.replicator.registration = {
            "scheduler": config.advertise_address or advertised(config.host, server.bound_port),
            "executor": config.executor,
            "model": engine.info.model,
            "block_size": engine.info.block_size,
            "num_blocks": engine.info.num_blocks,
            "holder": lease.holder,
        }
        await asyncio.to_thread(engine.replicator.register)
    engine.on_health = server.set_serving
    servicer.engine = engine
    engine.start()
    await server.set_serving(True)
    return engine


async def _listen(config: SchedulerConfig) -> RunningScheduler:
    """The gRPC server up, NOT_SERVING, with no engine yet (a standby until it holds the pool)."""
    server = GrpcServer(config.host, config.port, tls=internal_tls.active())
    servicer = SchedulerServicer(None, config.pool_id)
    server.add(scheduler_pb2_grpc.add_SchedulerServicer_to_server, servicer, SERVICE_NAME)
    await server.start()
    await server.set_serving(False)
    return RunningScheduler(server, servicer)


async def start(
    config: SchedulerConfig,
    executor: ExecutorClient,
    pool: BlockPool,
    *,
    lease: Lease | None = None,
    info_timeout: float | None = None,
) -> RunningScheduler:
    """Serve at once (NOT_SERVING, Submit UNAVAILABLE while a standby), then take the pool."""
    running = await _listen(config)
    server, servicer = running.server, running.servicer
    try:
        await serve_pool(server, servicer, config, executor, pool, lease, info_timeout=info_timeout)
    except BaseException:
        await server.stop(grace=0.1)
        raise
    return running


async def serve(config: SchedulerConfig) -> None:
    import redis

    from pagedserve.common.redis_connect import check, connect
    from pagedserve.executor.client import GrpcExecutorClient
    from pagedserve.scheduler.redis_pool import RedisBlockPool

    # A dead Redis must not hang the scheduler: every call gives up after a few seconds.
    client = connect(config.redis_url, socket_timeout=5.0, socket_connect_timeout=2.0)
    # A wrong password or certificate is a configuration error: stop now, saying so. A Redis
    # that does not answer yet is waited for (the lease loop retries).
    with contextlib.suppress(redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
        check(client, config.redis_url)
    pool = RedisBlockPool(client, config.pool_id)
    lease = Lease(client, config.pool_id, ttl=config.lease_ttl)
    running = await _listen(config)
    server, servicer = running.server, running.servicer
    log.info("scheduler listening on %s:%d for pool %r", config.host, running.port, config.pool_id)
    taking = asyncio.ensure_future(
        serve_pool(server, servicer, config, GrpcExecutorClient(config.executor), pool, lease)
    )

    def started(task: asyncio.Future) -> None:
        if task.cancelled():
            return
        if task.exception() is not None:
            log.error("scheduler could not take its pool: %s", task.exception())
            return
        limits = task.result().scheduler.limits
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

    taking.add_done_callback(started)

    async def stop() -> None:
        if not taking.done():
            taking.cancel()
            with contextlib.suppress(BaseException):
                await taking
        await running.stop()

    await run_until_signal(stop)


def main(args: argparse.Namespace) -> int:
    setup_logging("scheduler")
    try:
        internal_tls.configure_from_args(args)
    except ValueError as e:
        log.error("%s", e)
        return 2
    try:
        config = config_from_args(args)
    except ValueError as e:
        log.error("%s", e)
        return 2
    import redis

    from pagedserve.common.redis_connect import RedisSetupError, explain

    try:
        event_loop.run(serve(config))
    except RedisSetupError as e:
        log.error("%s", e)
        return 1
    except redis.exceptions.ConnectionError as e:
        log.error("%s", explain(e, config.redis_url))
        return 1
    return 0
