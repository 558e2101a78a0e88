"""`pagedserve gateway`: the public gRPC API and the OpenAI-compatible HTTP API in one process.

Both servers share one asyncio loop and one `Engine`, so they share the Detokenize stream,
the in-flight count and the metrics. The gRPC health service reports SERVING only once the
HTTP server is listening too; it is liveness only and does not follow the downstream services
(`/ready` does).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

import uvicorn

from pagedserve.common.grpc_utils import GrpcServer, full_names, run_until_signal
from pagedserve.common.logs import setup_logging
from pagedserve.common.models import default_model, served_model_name
from pagedserve.gateway.config import GatewayConfig
from pagedserve.gateway.downstream import SchedulerClient, TokenizerClient, close_all
from pagedserve.gateway.engine import Engine
from pagedserve.gateway.grpc_service import GatewayServicer
from pagedserve.gateway.http_api import build_app
from pagedserve.gateway.metrics import GatewayMetrics
from pagedserve.v1 import gateway_pb2_grpc

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (gRPC and HTTP)")
    parser.add_argument("--grpc-port", type=int, default=50051, help="public gRPC port")
    parser.add_argument("--http-port", type=int, default=8000, help="OpenAI-compatible HTTP port")
    parser.add_argument("--tokenizer", default="localhost:50052", help="tokenizer service address")
    parser.add_argument(
        "--scheduler",
        default="localhost:50053",
        help="scheduler address; several, comma-separated, for a pool's scheduler and its standbys",
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=30.0,
        help="seconds a request may make no progress while its scheduler is away (re-attaching "
        "meanwhile) before it fails with UNAVAILABLE / an error event",
    )
    parser.add_argument(
        "--model", default=None, help="served model path or hub id (default: the bundled model)"
    )
    parser.add_argument("--served-model-name", default=None, help="name clients use (default: from --model)")
    parser.add_argument(
        "--max-queued-requests",
        type=int,
        default=1024,
        help="requests in flight through this gateway before new ones get RESOURCE_EXHAUSTED / 429",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        help="seconds a request may take end to end (default: none)",
    )


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    model = args.model or default_model()
    if args.max_queued_requests < 1:
        raise SystemExit("--max-queued-requests must be >= 1")
    return GatewayConfig(
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        tokenizer_address=args.tokenizer,
        scheduler_address=args.scheduler,
        stall_timeout=args.stall_timeout,
        model=model,
        served_model_name=args.served_model_name or served_model_name(model),
        max_queued_requests=args.max_queued_requests,
        request_timeout=args.request_timeout if args.request_timeout and args.request_timeout > 0 else None,
    )


class _HttpServer(uvicorn.Server):
    """uvicorn on our loop; signals belong to `run_until_signal`, not to uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


async def serve(config: GatewayConfig) -> None:
    tokenizer = TokenizerClient(config.tokenizer_address, config.connect_timeout, config.detokenize_timeout)
    scheduler = SchedulerClient(config.scheduler_address, config.connect_timeout)
    metrics = GatewayMetrics()
    metrics.watch_detokenizer(tokenizer.detokenizer)
    engine = Engine(config, tokenizer, scheduler, metrics)

    http = _HttpServer(
        uvicorn.Config(
            build_app(engine, metrics),
            host=config.host,
            port=config.http_port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
    )
    http_task = asyncio.create_task(http.serve(), name="http")
    while not http.started:
        if http_task.done():
            await http_task
            raise OSError(f"the HTTP server did not start on {config.host}:{config.http_port}")
        await asyncio.sleep(0.02)

    grpc_server = GrpcServer(config.host, config.grpc_port)
    grpc_server.add(
        gateway_pb2_grpc.add_GatewayServicer_to_server, GatewayServicer(engine), *full_names(["Gateway"])
    )
    grpc_port = await grpc_server.start()

    async def stop() -> None:
        log.info("gateway stopping")
        await grpc_server.set_serving(False)
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
            config.scheduler_address,
        )

    await run_until_signal(stop, started)


def main(args: argparse.Namespace) -> int:
    setup_logging("gateway")
    config = config_from_args(args)
    try:
        asyncio.run(serve(config))
    except OSError as err:
        log.error("%s", err)
        return 1
    return 0
