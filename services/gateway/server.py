"""`pagedserve gateway`: the public gRPC API and the OpenAI-compatible HTTP API in one process.

Both servers share one asyncio loop and one `Engine`, so they share the Detokenize stream,
the in-flight count and the metrics. The gRPC health service reports SERVING only once the
HTTP server is listening too; it is liveness only and does not follow the downstream services
(`/ready` does). SIGTERM drains first (`drain`): new requests are refused while those in flight
get --shutdown-timeout seconds to finish.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

import grpc
import uvicorn
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

from pagedserve.common import event_loop, internal_tls, structured
from pagedserve.common.grpc_utils import GrpcServer, full_names, run_until_signal
from pagedserve.common.logs import setup_logging
from pagedserve.gateway import generation_defaults
from pagedserve.gateway.config import (
    GatewayConfig,
)
from pagedserve.gateway.downstream import TokenizerClient, close_all
from pagedserve.gateway.engine import Engine
from pagedserve.gateway.flags import add_arguments as add_arguments  # `pagedserve gateway`'s flags (cli.py)
from pagedserve.gateway.flags import config_from_args
from pagedserve.gateway.grpc_service import GatewayServicer
from pagedserve.gateway.http_api import build_app
from pagedserve.gateway.http_protocol import http_protocol
from pagedserve.gateway.local_detokenize import LocalDetokenizer
from pagedserve.gateway.metrics import GatewayMetrics
from pagedserve.gateway.routing import PoolRouter
from pagedserve.v1 import gateway_pb2_grpc

log = logging.getLogger(__name__)


class _HttpServer(uvicorn.Server):
    """uvicorn on our loop; signals belong to `run_until_signal`, not to uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def http_server(engine: Engine, metrics: GatewayMetrics) -> _HttpServer:
    """The HTTP server of `engine` (not started): uvicorn with the header deadline."""
    config = engine.config
    return _HttpServer(
        uvicorn.Config(
            build_app(engine, metrics),
            host=config.host,
            port=config.http_port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
            http=http_protocol(config.limits.read_timeout),
            ssl_certfile=config.tls_cert,
            ssl_keyfile=config.tls_key,
        )
    )


class TlsGrpcServer(GrpcServer):
    """`GrpcServer` listening with TLS: its `start`, with a secure port in place of the insecure one."""

    def __init__(self, host: str, port: int, cert_file: str, key_file: str) -> None:
        super().__init__(host, port)
        with open(cert_file, "rb") as cert, open(key_file, "rb") as key:
            self.credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])

    async def start(self) -> int:
        names = [*self._service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], self.server)
        self.bound_port = self.server.add_secure_port(f"{self.host}:{self.port}", self.credentials)
        if self.bound_port == 0:
            raise OSError(f"could not bind gRPC port {self.host}:{self.port}")
        await self.server.start()
        await self.set_serving(True)
        return self.bound_port


def grpc_server_for(config: GatewayConfig) -> GrpcServer:
    if config.tls_cert and config.tls_key:
        return TlsGrpcServer(config.host, config.grpc_port, config.tls_cert, config.tls_key)
    return GrpcServer(config.host, config.grpc_port)


async def drain(engine: Engine, grpc_server: GrpcServer) -> None:
    """Shutdown, first part: refuse new requests (503 / UNAVAILABLE, /ready 503, gRPC health
    NOT_SERVING), give those in flight --shutdown-timeout seconds, then end the rest with an
    error (a final error event on a stream) so that no client waits on a closed socket."""
    timeout = engine.config.shutdown_timeout
    log.info("gateway draining: %d requests in flight, %gs to finish", engine.num_in_flight, timeout)
    engine.start_drain()
    await grpc_server.set_serving(False)
    if not await engine.wait_idle(timeout):
        aborted = engine.abort_in_flight()
        log.info("gateway stopping: %d requests still running after %gs end with an error", aborted, timeout)
        await engine.wait_idle(2.0)


def pools_for(config: GatewayConfig) -> PoolRouter:
    """The pools this gateway routes over: static ones from --scheduler, the registry's with --redis-url."""
    static = [a for a in (config.scheduler_address, *config.more_pools) if a]
    if config.migration_limit < 0:
        raise SystemExit("--migration-limit must be >= 0")
    return PoolRouter(
        static,
        config.connect_timeout,
        redis_url=config.redis_url,
        policy=config.routing,
        prefill_weight=config.routing_prefill_weight,
        decode_weight=config.routing_decode_weight,
        migration_limit=config.migration_limit,
        shared_stream=config.scheduler_stream == "shared",
        state_redis_url=config.kv_map_redis_url,
    )


async def serve(config: GatewayConfig) -> None:
    tokenizer = TokenizerClient(config.tokenizer_address, config.connect_timeout, config.detokenize_timeout)
    scheduler = pools_for(config)
    await scheduler.check_redis()
    scheduler.start()
    metrics = GatewayMetrics()
    metrics.watch_pools(scheduler)
    if config.detokenize == "local":
        tokenizer.detokenizer = await asyncio.to_thread(LocalDetokenizer.load, config.model)
    metrics.watch_detokenizer(tokenizer.detokenizer)
    engine = Engine(config, tokenizer, scheduler, metrics)
    # Structured-output constraints are parsed on the event loop: load the library before serving
    # (off the loop), so that no request waits for the import and the gateway's memory is settled.
    await asyncio.to_thread(structured.warm_up)

    http = http_server(engine, metrics)
    http_task = asyncio.create_task(http.serve(), name="http")
    while not http.started:
        if http_task.done():
            await http_task
            raise OSError(f"the HTTP server did not start on {config.host}:{config.http_port}")
        await asyncio.sleep(0.02)

    grpc_server = grpc_server_for(config)
    grpc_server.add(
        gateway_pb2_grpc.add_GatewayServicer_to_server, GatewayServicer(engine), *full_names(["Gateway"])
    )
    grpc_port = await grpc_server.start()

    async def stop() -> None:
        await drain(engine, grpc_server)
        http.should_exit = True
        await grpc_server.stop(grace=2.0)
        await asyncio.wait_for(http_task, timeout=5)
        await engine.drain()
        await close_all(tokenizer, scheduler)

    def started() -> None:
        log.info(
            "gateway serving %s: gRPC on %s:%d, HTTP on %s:%d (tokenizer %s, scheduler %s)",
            config.served_model_name,
            config.host,
            grpc_port,
            config.host,
            config.http_port,
            config.tokenizer_address,
            config.scheduler_address or f"pools in {config.redis_url}",
        )
        if config.sampling_defaults:
            log.info(
                "default sampling parameters from the model's generation_config.json: %s (a request's "
                "own values win; --generation-config vllm ignores the file)",
                generation_defaults.describe(config.sampling_defaults),
            )

    await run_until_signal(stop, started)


def main(args: argparse.Namespace) -> int:
    setup_logging("gateway")
    try:
        internal_tls.configure_from_args(args)
    except ValueError as e:
        log.error("%s", e)
        return 2
    config = config_from_args(args)
    from pagedserve.common.redis_connect import RedisSetupError

    try:
        event_loop.run(serve(config))
    except (OSError, RedisSetupError) as err:
        log.error("%s", err)
        return 1
    return 0
