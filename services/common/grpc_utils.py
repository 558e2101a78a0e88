"""gRPC plumbing shared by every service: servers with health and reflection, error mapping.

Servicers stay thin: they convert protobuf to dataclasses, call the core, and let
`grpc_errors` turn a `PagedServeError` into its status code.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import signal
from collections.abc import Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pagedserve.common import internal_tls
from pagedserve.common.errors import PagedServeError, Unavailable
from pagedserve.common.internal_tls import InternalTLS

log = logging.getLogger(__name__)

# Large enough for a long prompt's token ids and a 256-sequence step.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
]
# For a client of another service: reconnect quickly after the service restarts (gRPC's
# default backoff grows to 120 s, during which fail-fast calls keep failing though it is back).
CLIENT_CHANNEL_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def _status(err: PagedServeError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, err.code, grpc.StatusCode.INTERNAL)


# Trailing metadata that carries a refused request's field (the `param` of an HTTP error), so
# that it survives each hop: the tokenizer's or scheduler's verdict reaches the gateway's
# client, and the gateway's reaches the SDK's `InvalidArgument.field`.
FIELD_METADATA_KEY = "pagedserve-field"


def _trailers(err: PagedServeError) -> tuple[tuple[str, str], ...]:
    return ((FIELD_METADATA_KEY, err.field),) if err.field and err.field.isascii() else ()


def field_of(err: grpc.RpcError) -> str | None:
    """The field a failed call's trailers name, if any."""
    trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    return next((value for key, value in trailers or () if key == FIELD_METADATA_KEY), None)


def grpc_errors(method: Callable) -> Callable:
    """Decorate an async servicer method (unary or async generator) so that a
    `PagedServeError` aborts the call with its status code and message."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except PagedServeError as err:
                await context.abort(_status(err), err.message, trailing_metadata=_trailers(err))

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except PagedServeError as err:
            await context.abort(_status(err), err.message, trailing_metadata=_trailers(err))

    return unary_wrapper


def error_from_rpc(err: grpc.RpcError, service: str) -> PagedServeError:
    """Map a failed downstream call to the error this service should answer with."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return error_from_status(code.name, details, service, field_of(err))


def error_from_status(code: str, details: str, service: str, field: str | None = None) -> PagedServeError:
    """The error for a downstream status, given by the name of its `grpc.StatusCode` member."""
    from pagedserve.common import errors

    if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        return Unavailable(f"{service} is unavailable: {details}")
    if code == "FAILED_PRECONDITION" and (details or "").startswith("fenced:"):
        return errors.Fenced(f"{service}: {details}")
    by_name = {
        "INVALID_ARGUMENT": errors.InvalidArgument,
        "NOT_FOUND": errors.NotFound,
        "RESOURCE_EXHAUSTED": errors.ResourceExhausted,
        "FAILED_PRECONDITION": errors.FailedPrecondition,
    }
    cls = by_name.get(code, PagedServeError)
    return cls(details or f"{service} failed with {code}", field=field)


class GrpcServer:
    """An asyncio gRPC server with the standard health service and reflection.

    `add(add_fn, servicer, service_name)` registers a generated `add_*Servicer_to_server`;
    every registered service and the overall server ("") report SERVING once `start()` ran.
    """

    def __init__(
        self, host: str, port: int, *, max_workers_hint: int = 0, tls: InternalTLS | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls  # internal mTLS (tokenizer, scheduler, executor); None or disabled: plain
        self.server = grpc.aio.server(options=CHANNEL_OPTIONS)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names: list[str] = []
        self._on_stop: list[Callable[[], object]] = []
        self.bound_port = 0

    def add(self, add_fn: Callable, servicer: object, service_name: str) -> None:
        add_fn(servicer, self.server)
        self._service_names.append(service_name)

    async def set_serving(self, serving: bool = True) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self._service_names]:
            res = self.health.set(name, status)
            if inspect.isawaitable(res):
                await res

    async def start(self) -> int:
        names = [
            *self._service_names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ]
        reflection.enable_server_reflection(names, self.server)
        address = f"{self.host}:{self.port}"
        if self.tls is not None and self.tls.enabled:
            self.bound_port = self.server.add_secure_port(address, self.tls.server_credentials())
        else:
            self.bound_port = self.server.add_insecure_port(address)
        if self.bound_port == 0:
            raise OSError(f"could not bind gRPC port {self.host}:{self.port}")
        await self.server.start()
        await self.set_serving(True)
        return self.bound_port

    def on_stop(self, fn: Callable[[], object]) -> None:
        """`fn()` runs once the server has stopped (a servicer's threads to end, say)."""
        self._on_stop.append(fn)

    async def stop(self, grace: float = 2.0) -> None:
        try:
            await self.set_serving(False)
            await self.server.stop(grace)
        finally:
            while self._on_stop:
                self._on_stop.pop()()


async def run_until_signal(stop: Callable[[], object], on_started: Callable[[], None] | None = None) -> None:
    """Wait for SIGINT/SIGTERM, then await `stop()`. Used by every service's entry point."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    if on_started is not None:
        on_started()
    await done.wait()
    res = stop()
    if inspect.isawaitable(res):
        await res


def health_check(
    address: str, service: str = "", timeout: float = 1.0, tls: InternalTLS | None = None
) -> bool:
    """True when the server at `address` reports SERVING for `service` (blocking); over the
    process's internal TLS unless `tls` is given."""
    try:
        with internal_tls.channel(address, tls=tls) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def full_names(services: Iterable[str]) -> list[str]:
    return [f"pagedserve.v1.{s}" for s in services]
