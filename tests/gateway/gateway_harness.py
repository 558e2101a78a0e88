"""The gateway's real servers for the tests, against the in-process stand-ins of `gateway_fakes`:
`serving` runs its uvicorn HTTP server on a socket, `grpc_gateway` its gRPC servicer on a real
grpc.aio server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
from gateway_fakes import FakeScheduler, FakeTokenizer

from pagedserve.common.grpc_utils import GrpcServer
from pagedserve.common.redis_harness import free_port
from pagedserve.gateway.config import GatewayConfig
from pagedserve.gateway.engine import Engine
from pagedserve.gateway.grpc_service import GatewayServicer
from pagedserve.gateway.metrics import GatewayMetrics
from pagedserve.gateway.server import http_server
from pagedserve.v1 import gateway_pb2_grpc

MODEL = "/models/tiny-py"
JSON = {"content-type": "application/json"}


@contextlib.asynccontextmanager
async def serving(
    scheduler: FakeScheduler, tokenizer: FakeTokenizer | None = None, **config
) -> AsyncIterator[tuple[str, Engine]]:
    """The gateway's HTTP server on a free port; yields (base url, engine)."""
    port = free_port()
    cfg = GatewayConfig(host="127.0.0.1", http_port=port, model=MODEL, **config)
    engine = Engine(cfg, tokenizer or FakeTokenizer(), scheduler)
    server = http_server(engine, GatewayMetrics())
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "the HTTP server did not start"
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        await task


def run(scenario) -> None:
    asyncio.run(scenario())


def assert_error(reply: httpx.Response, status: int, words: str, param: str | None = None) -> dict:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/json"
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"], error["message"]
    if param is not None:
        assert error["param"] == param
    return error


async def raw_exchange(url: str, request: bytes, wait: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes (or `wait` runs out)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    await writer.drain()
    data = b""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait):
            while chunk := await reader.read(65536):
                data += chunk
    writer.close()
    return data


@contextlib.asynccontextmanager
async def grpc_gateway(scheduler: FakeScheduler, **config) -> AsyncIterator[str]:
    """The Gateway servicer on a real gRPC server; yields its address."""
    port = free_port()
    engine = Engine(GatewayConfig(model=MODEL, **config), FakeTokenizer(), scheduler)
    server = GrpcServer("127.0.0.1", port)
    server.add(
        gateway_pb2_grpc.add_GatewayServicer_to_server, GatewayServicer(engine), "pagedserve.v1.Gateway"
    )
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=0.5)
