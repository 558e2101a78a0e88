"""The end-to-end harness: the four services as separate processes, and reference outputs.

`Stack` runs `pagedserve executor | tokenizer | scheduler | gateway` on free ports, waits for
each to report SERVING on the standard gRPC health service, and stops every process group,
failing if any process outlives it. `Stack.assert_clean()` waits for the pool to be idle (no
running or waiting request, no referenced block) and runs `pagedserve fsck` on it. `gateway()`
runs one more gateway, with other flags, on a stack's tokenizer and scheduler.

Kept out of conftest.py so that test modules can import it by a unique name.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
from hf_reference import reference_greedy as hf_greedy  # noqa: F401  (re-exported to the tests)

from pagedserve.common.grpc_utils import health_check
from pagedserve.common.process import ChildProcess, stop_all
from pagedserve.common.redis_harness import free_ports
from pagedserve.v1 import scheduler_pb2, scheduler_pb2_grpc

PAGEDSERVE = (sys.executable, "-m", "pagedserve.cli")
STARTUP_TIMEOUT_S = 180.0  # the executor loads torch and the model on two busy cores
IDLE_TIMEOUT_S = 10.0
BLOCK_SIZE = 16
NUM_KV_BLOCKS = 512
MAX_MODEL_LEN = 384  # keeps "fill the context" answers short on CPU
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PAGEDSERVE_LOG_LEVEL": "INFO",
    "PYTHONUNBUFFERED": "1",
}


@dataclass(slots=True)
class Service:
    name: str
    command: list[str]
    address: str  # host:port of its gRPC server (the health check target)
    child: ChildProcess | None = None


@dataclass
class Stack:
    """One executor, tokenizer, scheduler and gateway, each its own process (group)."""

    model: str
    redis_url: str
    log_dir: Path
    num_kv_blocks: int = NUM_KV_BLOCKS
    max_queued_requests: int = 1024
    standby: bool = False  # a second scheduler for the same pool, waiting for its lease
    stall_timeout: float = 30.0  # the scheduler's and the gateway's --stall-timeout
    lease_ttl: float = 3.0
    host: str = "127.0.0.1"
    executor_args: tuple[str, ...] = ()  # more executor flags (e.g. --swap-space)
    scheduler_args: tuple[str, ...] = ()  # more scheduler flags (e.g. --preemption-mode)
    services: dict[str, Service] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = ("executor", "tokenizer", "scheduler", "standby", "grpc", "http")
        ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.executor_address = f"{self.host}:{ports['executor']}"
        self.tokenizer_address = f"{self.host}:{ports['tokenizer']}"
        self.scheduler_address = f"{self.host}:{ports['scheduler']}"
        self.standby_address = f"{self.host}:{ports['standby']}"
        self.scheduler_addresses = [self.scheduler_address] + ([self.standby_address] if self.standby else [])
        self.grpc_address = f"{self.host}:{ports['grpc']}"
        self.http_url = f"http://{self.host}:{ports['http']}"
        self.pool_id = f"e2e-{ports['executor']}"
        model = ("--model", self.model)
        commands = {
            "executor": [
                "--host", self.host, "--port", str(ports["executor"]), *model,
                "--block-size", str(BLOCK_SIZE), "--num-kv-blocks", str(self.num_kv_blocks),
                "--device", "cpu", "--max-model-len", str(MAX_MODEL_LEN), *self.executor_args,
            ],
            "tokenizer": ["--host", self.host, "--port", str(ports["tokenizer"]), *model],
            "scheduler": self.scheduler_flags(ports["scheduler"]),
            "gateway": self.gateway_flags(ports["grpc"], ports["http"], self.max_queued_requests),
        }  # fmt: skip
        addresses = {
            "executor": self.executor_address,
            "tokenizer": self.tokenizer_address,
            "scheduler": self.scheduler_address,
            "gateway": self.grpc_address,
        }
        if self.standby:
            commands["standby"] = self.scheduler_flags(ports["standby"])
            addresses["standby"] = self.standby_address
        for name, flags in commands.items():
            kind = "scheduler" if name == "standby" else name
            self.services[name] = Service(name, [*PAGEDSERVE, kind, *flags], addresses[name])

    def scheduler_flags(self, port: int) -> list[str]:
        return [
            "--host", self.host, "--port", str(port),
            "--executor", self.executor_address, "--redis-url", self.redis_url,
            "--pool-id", self.pool_id, "--stall-timeout", str(self.stall_timeout),
            "--lease-ttl", str(self.lease_ttl), *self.scheduler_args,
        ]  # fmt: skip

    def gateway_flags(self, grpc_port: int, http_port: int, max_queued_requests: int) -> list[str]:
        return [
            "--host", self.host, "--grpc-port", str(grpc_port), "--http-port", str(http_port),
            "--tokenizer", self.tokenizer_address, "--scheduler", ",".join(self.scheduler_addresses),
            "--kv-map-redis-url", self.redis_url,
            "--model", self.model, "--max-queued-requests", str(max_queued_requests),
            "--stall-timeout", str(self.stall_timeout),
        ]  # fmt: skip

    # -- life cycle --------------------------------------------------------------------

    def start(self) -> Stack:
        """Start in dependency order, independent services together; wait for SERVING."""
        try:
            for tier in (("executor", "tokenizer"), ("scheduler",), ("gateway",)):
                for name in tier:
                    self._spawn(name)
                for name in tier:
                    self.wait_serving(name)
            if self.standby:
                self._spawn("standby")
                self.wait_listening("standby")
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str) -> None:
        service = self.services[name]
        service.child = ChildProcess(
            name, service.command, env=ENV, log_path=self.log_dir / f"{name}.log"
        ).start()

    def wait_serving(self, name: str, timeout: float = STARTUP_TIMEOUT_S) -> None:
        service = self.services[name]
        deadline = time.monotonic() + timeout
        while not health_check(service.address, timeout=1.0):
            code = service.child.poll() if service.child else None
            if code is not None:
                pytest.fail(f"{name} exited with {code} during start-up:\n{self.log_tail(name)}")
            if time.monotonic() > deadline:
                pytest.fail(f"{name} did not report SERVING within {timeout}s:\n{self.log_tail(name)}")
            time.sleep(0.1)

    def wait_listening(self, name: str, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Until the service answers its health check at all (a standby reports NOT_SERVING)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        service = self.services[name]
        deadline = time.monotonic() + timeout
        while True:
            with grpc.insecure_channel(service.address) as channel:
                try:
                    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    return
                except grpc.RpcError:
                    pass
            if service.child is not None and service.child.poll() is not None:
                pytest.fail(f"{name} exited during start-up:\n{self.log_tail(name)}")
            if time.monotonic() > deadline:
                pytest.fail(f"{name} did not answer within {timeout}s:\n{self.log_tail(name)}")
            time.sleep(0.1)

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def kill(self, name: str) -> None:
        """SIGKILL a service's whole process group (a crash, not a shutdown)."""
        child = self.services[name].child
        assert child is not None and child.proc is not None
        child.signal_group(signal.SIGKILL)
        child.proc.wait(timeout=10)
        child.close()

    def restart(self, name: str, *, wait: bool = True) -> None:
        self._spawn(name)
        if wait:
            self.wait_serving(name)

    def stop(self) -> None:
        """Stop every service (gateway first) and check that no process of any group survives."""
        children = [s.child for s in reversed(list(self.services.values())) if s.child is not None]
        stop_all(children, grace=10.0)
        survivors = []
        for child in children:
            child.close()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, 0)
                survivors.append(child.name)
        for service in self.services.values():
            service.child = None
        assert not survivors, f"processes left behind by {survivors}"

    @contextlib.contextmanager
    def extra_gateway(self, **flags: int) -> Iterator[tuple[str, str]]:
        """A second gateway on the same tokenizer and scheduler; yields (grpc address, http url)."""
        grpc_port, http_port = free_ports(2)
        name = f"gateway-{grpc_port}"
        service = Service(
            name,
            [
                *PAGEDSERVE,
                "gateway",
                *self.gateway_flags(grpc_port, http_port, flags.get("max_queued_requests", 1024)),
            ],
            f"{self.host}:{grpc_port}",
        )
        self.services[name] = service
        try:
            self._spawn(name)
            self.wait_serving(name)
            yield service.address, f"http://{self.host}:{http_port}"
        finally:
            if service.child is not None:
                stop_all([service.child], grace=5.0)
                service.child.close()
            del self.services[name]

    # -- observation -------------------------------------------------------------------

    def stats(self, timeout: float = 5.0) -> scheduler_pb2.StatsResponse:
        """Stats of the scheduler that holds the pool (a standby answers UNAVAILABLE)."""
        error: grpc.RpcError | None = None
        for address in self.scheduler_addresses:
            with grpc.insecure_channel(address) as channel:
                try:
                    return scheduler_pb2_grpc.SchedulerStub(channel).Stats(
                        scheduler_pb2.StatsRequest(), timeout=timeout
                    )
                except grpc.RpcError as err:
                    error = err
        assert error is not None
        raise error

    def wait_idle(self, timeout: float = IDLE_TIMEOUT_S) -> scheduler_pb2.StatsResponse:
        """Stats once nothing runs, waits or holds a block; fails with the last Stats otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if stats.requests_running == 0 and stats.requests_waiting == 0 and stats.blocks_used == 0:
                return stats
            if time.monotonic() > deadline:
                pytest.fail(f"the pool is not idle {timeout}s after the test:\n{stats}")
            time.sleep(0.05)

    def fsck(self) -> list[str]:
        import redis

        from pagedserve.scheduler.fsck import fsck

        client = redis.Redis.from_url(self.redis_url, decode_responses=True)
        try:
            return fsck(client, self.pool_id)
        finally:
            client.close()

    def redis_digest(self) -> str:
        import redis

        from pagedserve.scheduler.redis_pool import RedisBlockPool

        client = redis.Redis.from_url(self.redis_url)
        try:
            return RedisBlockPool(client, self.pool_id).snapshot().digest()
        finally:
            client.close()

    def assert_clean(self) -> None:
        """Idle, fsck clean, and Redis equal to the scheduler's own view of the pool."""
        self.wait_idle()
        problems = self.fsck()
        assert not problems, "fsck:\n" + "\n".join(problems)
        deadline = time.monotonic() + IDLE_TIMEOUT_S
        while True:
            mine = self.stats_with_digest().blocks_digest
            if mine and mine == self.redis_digest():
                return
            assert time.monotonic() < deadline, f"Redis differs from the scheduler's view ({mine!r})"
            time.sleep(0.05)

    def stats_with_digest(self) -> scheduler_pb2.StatsResponse:
        for address in self.scheduler_addresses:
            with grpc.insecure_channel(address) as channel:
                with contextlib.suppress(grpc.RpcError):
                    return scheduler_pb2_grpc.SchedulerStub(channel).Stats(
                        scheduler_pb2.StatsRequest(with_digest=True), timeout=5.0
                    )
        pytest.fail("no scheduler answers Stats")


LIVE_STACKS: list[Stack] = []


@contextlib.contextmanager
def running_stack(model: str, redis_url: str, log_dir: Path, **kwargs) -> Iterator[Stack]:
    """A started stack, stopped (and checked for orphans) on exit; its logs stay in `log_dir`."""
    stack = Stack(model=model, redis_url=redis_url, log_dir=log_dir, **kwargs).start()
    LIVE_STACKS.append(stack)
    try:
        yield stack
    finally:
        LIVE_STACKS.remove(stack)
        stack.stop()


def metric(text: str, name: str) -> float:
    """The value of an unlabelled sample `name` in Prometheus text."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


@contextlib.contextmanager
def gateway(stack: Stack, log_dir: Path, *flags: str) -> Iterator[tuple[str, str, ChildProcess]]:
    """Another gateway process on the stack's tokenizer and scheduler, with `flags`; yields
    (gRPC address, HTTP url, its process)."""
    grpc_port, http_port = free_ports(2)
    command = [
        *PAGEDSERVE, "gateway", "--host", stack.host, "--grpc-port", str(grpc_port),
        "--http-port", str(http_port), "--tokenizer", stack.tokenizer_address,
        "--scheduler", stack.scheduler_address, "--model", stack.model, *flags,
    ]  # fmt: skip
    child = ChildProcess(
        f"gateway-{grpc_port}", command, env=ENV, log_path=log_dir / f"gateway-{grpc_port}.log"
    )
    child.start()
    try:
        deadline = time.monotonic() + 60
        while not health_check(f"{stack.host}:{grpc_port}", timeout=1.0):
            assert child.poll() is None, f"the gateway exited with {child.poll()}"
            assert time.monotonic() < deadline, "the gateway did not start within 60 s"
            time.sleep(0.1)
        yield f"{stack.host}:{grpc_port}", f"http://{stack.host}:{http_port}", child
    finally:
        stop_all([child], grace=5.0)
        child.close()


def assert_error(reply: httpx.Response, status: int, message: str, param: str | None = None) -> None:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"], error["message"]
    if param is not None:
        assert error["param"] == param
