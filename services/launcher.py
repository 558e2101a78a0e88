"""`pagedserve up`: Redis and every service as local processes, started and stopped together.

Start order follows the dependencies: the executor and the tokenizer, then the scheduler
(which needs the executor and Redis), then the gateway (which needs the tokenizer and the
scheduler). A tier must report SERVING on the standard gRPC health service before the next
one starts. A service whose module is not there is skipped, and so is every service that
needs it; the launcher says which, so `up` works with whatever part of the stack exists.

Redis is a child like the others (a local `redis-server` on a free port, started first and
stopped last) unless `--redis-url` names one; with no `redis-server` installed, the Redis of
`redis_harness` (Docker) is used, and that one is not supervised.

A child that exits during start-up fails the start-up: the launcher prints its name, how it
exited and the last lines of its stderr, stops the rest and exits 1. Once the stack is
ready, a child that exits is reported the same way and started again with the same
command — Redis on the same port, empty — after a backoff (`RestartPolicy`: 0.5 s doubling
to 10 s); past `--max-restarts` restarts of one child within `--restart-window` seconds, or
with `--no-restart`, the launcher stops everything and exits 1 instead. The old process is
reaped, and its process group gone, before the new one starts. The scheduler notices a new
executor by its epoch, and the services reconnect to whatever they lost.

SIGINT, SIGTERM or SIGHUP stop every child — SIGTERM to its process group, SIGKILL after
`--stop-timeout` — gateway first, Redis last; a second Ctrl-C skips the wait. Children are
started with PR_SET_PDEATHSIG (Linux), so that a launcher that is SIGKILLed leaves no child
running: the kernel sends each one SIGTERM. Every child is started on the thread that runs
`serve` (the main thread in `pagedserve up`), since that signal follows the starting thread.

Exit status: 0 when stopped by a signal once ready; 1 when a service failed or was not
SERVING in time, or died more often than allowed; 128 + the signal when stopped during
start-up; 2 for bad flags.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import NamedTuple, TextIO

from pagedserve.cli import SUBCOMMANDS
from pagedserve.common import internal_tls
from pagedserve.common.certs import make_certs
from pagedserve.common.grpc_utils import health_check
from pagedserve.common.models import default_model
from pagedserve.common.process import (
    ChildProcess,
    RestartHistory,
    RestartPolicy,
    signal_name,
    stop_all,
    write_line,
)
from pagedserve.common.redis_connect import redact
from pagedserve.common.redis_harness import (
    RedisServer,
    RedisUnavailable,
    ensure_redis_server_binary,
    free_port,
)
from pagedserve.common.sizes import parse_byte_size

READY = "pagedserve up: ready"
# How a service is run: the same interpreter, so the same environment, as the launcher.
PAGEDSERVE = (sys.executable, "-m", "pagedserve.cli")
_WILDCARD_HOSTS = ("", "0.0.0.0", "::")
WATCH_INTERVAL = 0.25  # seconds between looks at the children once the stack is ready
REAP_TIMEOUT = 5.0  # seconds a dead child's process group gets to be gone before a restart


@dataclass(frozen=True, slots=True)
class LauncherConfig:
    """Everything `pagedserve up` needs; None means "the service's own default"."""

    model: str
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 50051
    tokenizer_port: int = 50052
    scheduler_port: int = 50053
    executor_port: int = 50054
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int | None = None  # bytes
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    max_queued_requests: int | None = None
    served_model_name: tuple[str, ...] = ()  # names the gateway serves the model under (default: --model)
    stall_timeout: float | None = None  # the scheduler's and the gateway's --stall-timeout
    scheduler_stream: str | None = None  # the gateway's --scheduler-stream (default: shared)
    cpu_threads: int | None = None  # the executor's torch threads (default: its own)
    cpu_affinity: str | None = None  # cores the executor is pinned to, e.g. "1" or "2-3"
    compile: bool = False  # the executor's torch.compile'd forward
    enforce_eager: bool = False  # the executor's --enforce-eager (no CUDA graphs, no compile)
    swap_space: float | None = None  # the executor's --swap-space (GiB of CPU blocks)
    preemption_mode: str | None = None  # the scheduler's --preemption-mode
    pools: int = 1  # executor + scheduler pairs; pool i > 0 takes the executor/scheduler ports + 100 * i
    attention_backend: str | None = None
    dtype: str | None = None
    redis_url: str | None = None  # None: start a throwaway Redis
    internal_tls: bool = False  # mutual TLS between the services, with certificates made at start
    internal_tls_cert: str | None = None  # or with these files (every service presents this one)
    internal_tls_key: str | None = None
    internal_tls_ca: str | None = None
    startup_timeout: float = 300.0  # seconds for the whole stack to report SERVING
    stop_timeout: float = 10.0  # seconds each tier gets between SIGTERM and SIGKILL
    log_dir: str | None = None  # None: children's output goes to the terminal, prefixed
    restart: bool = True  # False (--no-restart): a child that dies once ready stops everything
    max_restarts: int = 5  # restarts of one child within restart_window before giving up
    restart_window: float = 60.0  # seconds
    restart_backoff: float = 0.5  # seconds before the first restart; doubles with each one
    restart_backoff_max: float = 10.0  # seconds

    def __post_init__(self) -> None:
        if self.num_kv_blocks is not None and self.kv_cache_memory is not None:
            raise ValueError("give --num-kv-blocks or --kv-cache-memory, not both")
        ports = [self.http_port, self.grpc_port, self.tokenizer_port, self.scheduler_port, self.executor_port]
        if len(set(ports)) != len(ports):
            raise ValueError(f"the five ports must differ, got {ports}")
        if self.startup_timeout <= 0 or self.stop_timeout < 0:
            raise ValueError("--startup-timeout must be > 0 and --stop-timeout >= 0")
        if self.pools < 1:
            raise ValueError(f"--pools must be >= 1, got {self.pools}")
        if self.max_restarts < 0 or self.restart_window <= 0:
            raise ValueError("--max-restarts must be >= 0 and --restart-window > 0")
        if not 0 <= self.restart_backoff <= self.restart_backoff_max:
            raise ValueError("the restart backoff must be >= 0 and at most its maximum")
        if self.internal_tls and self.internal_tls_cert:
            raise ValueError(
                "give --internal-tls (make certificates) or --internal-tls-cert/-key/-ca, not both"
            )
        if self.internal_tls_cert or self.internal_tls_key or self.internal_tls_ca:
            internal_tls.load(self.internal_tls_cert, self.internal_tls_key, self.internal_tls_ca)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LauncherConfig:
        """The config from parsed flags; a field with no flag keeps its default."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    @property
    def restart_policy(self) -> RestartPolicy:
        return RestartPolicy(
            self.max_restarts, self.restart_window, self.restart_backoff, self.restart_backoff_max
        )

    @property
    def connect_host(self) -> str:
        """Where the launcher and the services reach each other: loopback for a wildcard bind."""
        return "127.0.0.1" if self.host in _WILDCARD_HOSTS else self.host


class ServiceSpec(NamedTuple):
    name: str
    command: tuple[str, ...]  # PAGEDSERVE + (subcommand, flags...)
    health_address: str  # host:port answering grpc.health.v1
    ports: tuple[int, ...]  # every port it binds, checked free before anything starts
    needs: tuple[str, ...]  # services that must be SERVING first
    tier: int  # start order: every service of tier n is SERVING before tier n + 1 starts
    # How it says it is ready: "grpc" (health service SERVING, over the internal TLS when on),
    # "public" (the same on the gateway's public port, plain) or "redis" (PING).
    probe: str = "grpc"


class Plan(NamedTuple):
    specs: list[ServiceSpec]
    skipped: dict[str, str]  # name -> why


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def module_available(service: str) -> bool:
    """True when the module behind `pagedserve <service>` exists (it is not imported)."""
    try:
        return importlib.util.find_spec(SUBCOMMANDS[service][0]) is not None
    except (ImportError, ValueError):
        return False


def _opt(flag: str, value: object) -> tuple[str, ...]:
    return () if value is None else (flag, str(value))


def plan(config: LauncherConfig, redis_url: str, available=module_available) -> Plan:
    """The services to start, in order, and those skipped (module missing, or a need skipped)."""
    host, near = config.host, config.connect_host
    executor_address = hostport(near, config.executor_port)
    tokenizer_address = hostport(near, config.tokenizer_port)
    scheduler_address = hostport(near, config.scheduler_port)
    model = ("--model", config.model)
    batching = (
        *_opt("--max-model-len", config.max_model_len),
        *_opt("--max-num-batched-tokens", config.max_num_batched_tokens),
    )
    wanted = [
        ("executor", (), (config.executor_port,),
         ("--host", host, "--port", str(config.executor_port), *model,
          "--block-size", str(config.block_size),
          *_opt("--num-kv-blocks", config.num_kv_blocks), *_opt("--kv-cache-memory", config.kv_cache_memory),
          *batching, *_opt("--dtype", config.dtype), *_opt("--attention-backend", config.attention_backend),
          *_opt("--cpu-threads", config.cpu_threads), *_opt("--cpu-affinity", config.cpu_affinity),
          *_opt("--swap-space", config.swap_space),
          *(("--compile",) if config.compile else ()),
          *(("--enforce-eager",) if config.enforce_eager else ()))),
        ("tokenizer", (), (config.tokenizer_port,),
         ("--host", host, "--port", str(config.tokenizer_port), *model)),
        ("scheduler", ("executor",), (config.scheduler_port,),
         ("--host", host, "--port", str(config.scheduler_port), "--executor", executor_address,
          "--redis-url", redis_url, *_opt("--max-num-seqs", config.max_num_seqs), *batching,
          *_opt("--max-queued-requests", config.max_queued_requests),
          *_opt("--preemption-mode", config.preemption_mode),
          *_opt("--stall-timeout", config.stall_timeout))),
        ("gateway", ("tokenizer", "scheduler"), (config.grpc_port, config.http_port),
         ("--host", host, "--grpc-port", str(config.grpc_port), "--http-port", str(config.http_port),
          "--tokenizer", tokenizer_address, "--scheduler", scheduler_address,
          "--kv-map-redis-url", redis_url, *model,
          *_opt("--max-queued-requests", config.max_queued_requests),
          *(("--served-model-name", *config.served_model_name) if config.served_model_name else ()),
          *_opt("--stall-timeout", config.stall_timeout), *_opt("--scheduler-stream", config.scheduler_stream))),
    ]  # fmt: skip
    if config.pools > 1:
        wanted = _with_pools(config, wanted, redis_url)
    if config.internal_tls_cert:
        tls = (*_opt("--internal-tls-cert", config.internal_tls_cert), *_opt("--internal-tls-key", config.internal_tls_key),
               *_opt("--internal-tls-ca", config.internal_tls_ca))  # fmt: skip
        wanted = [(name, needs, ports, (*flags, *tls)) for name, needs, ports, flags in wanted]
    specs: list[ServiceSpec] = []
    skipped: dict[str, str] = {}
    tiers: dict[str, int] = {}
    for name, needs, ports, flags in wanted:
        missing = [n for n in needs if n in skipped]
        if not available(name.split("-")[0]):
            skipped[name] = f"module {SUBCOMMANDS[name][0]} not found"
        elif missing:
            skipped[name] = f"needs {', '.join(missing)}"
        else:
            tiers[name] = 1 + max((tiers[n] for n in needs), default=-1)
            address = hostport(near, ports[0])
            # The gateway's public port never speaks the internal mutual TLS.
            probe = "public" if name == "gateway" else "grpc"
            specs.append(
                ServiceSpec(
                    name, (*PAGEDSERVE, name.split("-")[0], *flags), address, ports, needs, tiers[name], probe
                )
            )
    return Plan(specs, skipped)


def _with_pools(config: LauncherConfig, wanted: list, redis_url: str) -> list:
    """`--pools N`: executor-i + scheduler-i for i in 1..N-1 (ports + 100 * i), every scheduler
    with its own --pool-id, and the gateway finding them all in the registry (--redis-url)."""
    by_name = {w[0]: w for w in wanted}
    out = [w for w in wanted if w[0] not in ("scheduler", "gateway")]
    schedulers = []
    for i in range(config.pools):
        e_port, s_port = config.executor_port + 100 * i, config.scheduler_port + 100 * i
        executor, scheduler = ("executor", "scheduler") if i == 0 else (f"executor-{i}", f"scheduler-{i}")
        if i:
            flags = _replace_flag(by_name["executor"][3], "--port", str(e_port))
            out.append((executor, (), (e_port,), flags))
        flags = _replace_flag(by_name["scheduler"][3], "--port", str(s_port))
        flags = _replace_flag(flags, "--executor", hostport(config.connect_host, e_port))
        out.append((scheduler, (executor,), (s_port,), (*flags, "--pool-id", f"pool-{i}")))
        schedulers.append(scheduler)
    name, needs, ports, flags = by_name["gateway"]
    at = flags.index("--scheduler")
    flags = (*flags[:at], "--redis-url", redis_url, *flags[at + 2 :])
    out.append((name, ("tokenizer", *schedulers), ports, flags))
    return out


def _replace_flag(flags: tuple[str, ...], flag: str, value: str) -> tuple[str, ...]:
    at = flags.index(flag)
    return (*flags[: at + 1], value, *flags[at + 2 :])


def redis_spec(binary: str, port: int, data_dir: str) -> ServiceSpec:
    """A throwaway `redis-server` on 127.0.0.1:`port`, started before (tier -1) and stopped
    after every service. Nothing is saved, so a restarted one is empty. It logs to stderr,
    so that its last lines are there to report if it dies."""
    command = (binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", data_dir, "--save", "",
               "--appendonly", "no", "--daemonize", "no", "--protected-mode", "yes",
               "--loglevel", "warning", "--logfile", "/dev/stderr")  # fmt: skip
    return ServiceSpec("redis", command, f"127.0.0.1:{port}", (port,), (), -1, "redis")


def redis_ping(address: str, timeout: float = 1.0) -> bool:
    """True when the Redis at host:port answers PING."""
    import redis

    host, port = address.rsplit(":", 1)
    client = redis.Redis(host=host, port=int(port), socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        return bool(client.ping())
    except redis.exceptions.RedisError:
        return False
    finally:
        client.close()


def given_redis_problem(url: str, timeout: float = 5.0) -> str | None:
    """Why the Redis at `url` (given with --redis-url) cannot serve the stack, or None: a bad
    URL, a refused password, a bad certificate, or no answer at all, said before anything starts."""
    from pagedserve.common.redis_connect import RedisSetupError, check, connect

    client = None
    try:
        client = connect(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        check(client, url, strict=True)
    except RedisSetupError as err:
        return str(err)
    except Exception as err:  # a cluster client that found no node answering
        return f"cannot use --redis-url {redact(url)}: {err}"
    finally:
        if client is not None:
            client.close()
    return None


def is_ready(spec: ServiceSpec, timeout: float = 1.0) -> bool:
    """True when `spec`'s process answers its readiness probe."""
    if spec.probe == "redis":
        return redis_ping(spec.health_address, timeout)
    if spec.probe == "public":
        return health_check(spec.health_address, timeout=timeout, tls=internal_tls.InternalTLS())
    return health_check(spec.health_address, timeout=timeout)


def ports_in_use(host: str, ports: list[int]) -> list[int]:
    """The ports among `ports` that something already listens on at `host`.

    SO_REUSEADDR lets a port in TIME_WAIT pass; without SO_REUSEPORT a listener fails the
    bind. This matters: gRPC servers set SO_REUSEPORT, so a second one would share the port
    with a stale one instead of failing, and a health check could answer from the wrong process.
    """
    busy = []
    for port in ports:
        family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError:
                busy.append(port)
    return busy


class Launcher:
    """Runs a plan's services as child processes; `request_stop` (from a signal handler
    or another thread) ends `serve`/`run`, which always stop every child before returning."""

    def __init__(
        self, config: LauncherConfig, *, out: TextIO | None = None, err: TextIO | None = None
    ) -> None:
        self.config = config
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.children: dict[str, tuple[ServiceSpec, ChildProcess]] = {}
        self.stop_signal = 0
        # Supervision, once ready: each child's restarts, when each dead one starts again,
        # and the restarted ones that have not answered their probe yet.
        self._restarts: dict[str, RestartHistory] = {}
        self._restart_due: dict[str, float] = {}
        self._not_ready_again: set[str] = set()
        self._stop = threading.Event()
        self._hurry = threading.Event()
        self._launched = time.monotonic()

    def say(self, message: str, *, error: bool = False) -> None:
        write_line(self.err if error else self.out, f"pagedserve up: {message}")

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """First call: stop cleanly. Second call: stop without waiting for the grace period."""
        if self._stop.is_set():
            self._hurry.set()
            return
        self.stop_signal = signum
        self._stop.set()

    def run(self) -> int:
        """Make the internal certificates when asked, then `run_stack`."""
        if not self.config.internal_tls:
            if self.config.internal_tls_cert:
                c = self.config
                internal_tls.configure(
                    internal_tls.load(c.internal_tls_cert, c.internal_tls_key, c.internal_tls_ca)
                )
            return self.run_stack()
        cert_dir = tempfile.mkdtemp(prefix="pagedserve-tls-")
        try:
            names = tuple(
                dict.fromkeys(("localhost", "127.0.0.1", self.config.connect_host, socket.gethostname()))
            )
            files = make_certs(cert_dir, names)
            self.say(f"internal mutual TLS: a throwaway CA and certificate in {cert_dir}")
            self.config = replace(self.config, internal_tls=False, internal_tls_cert=files.cert,
                                  internal_tls_key=files.key, internal_tls_ca=files.ca)  # fmt: skip
            internal_tls.configure(internal_tls.load(files.cert, files.key, files.ca))
            return self.run_stack()
        finally:
            shutil.rmtree(cert_dir, ignore_errors=True)

    def run_stack(self) -> int:
        """Start Redis (unless a URL was given) and the planned services; wait; stop all."""
        redis_url = self.config.redis_url
        if redis_url is not None:
            problem = given_redis_problem(redis_url)
            if problem:
                self.say(problem, error=True)
                return 1
            specs, skipped = plan(self.config, redis_url)
            return self.serve(
                specs, skipped, extra_endpoints=[("redis", f"{redact(redis_url)} (given with --redis-url)")]
            )
        try:
            binary = ensure_redis_server_binary()
        except RedisUnavailable:
            return self._run_with_harness_redis()
        data_dir = tempfile.mkdtemp(prefix="pagedserve-redis-")
        try:
            redis = redis_spec(binary, free_port(), data_dir)
            specs, skipped = plan(self.config, f"redis://{redis.health_address}/0")
            return self.serve([redis, *specs], skipped)
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)

    def _run_with_harness_redis(self) -> int:
        """No `redis-server` here: Redis in Docker, if a daemon answers; not supervised."""
        self.say("no redis-server installed: starting Redis with Docker (not restarted if it dies)")
        try:
            redis = RedisServer().start()
        except RedisUnavailable as exc:
            self.say(f"cannot start Redis: {exc}", error=True)
            return 1
        try:
            specs, skipped = plan(self.config, redis.url)
            return self.serve(specs, skipped, extra_endpoints=[("redis", f"{redis.url} ({redis.kind})")])
        finally:
            self.say("stopping Redis")
            redis.stop()

    def serve(
        self,
        specs: list[ServiceSpec],
        skipped: dict[str, str] | None = None,
        extra_endpoints: list[tuple[str, str]] | None = None,
    ) -> int:
        """Start `specs` tier by tier, print the endpoints once all are SERVING, and wait
        for a stop request or a child's exit. Every child is stopped before this returns."""
        for name, why in (skipped or {}).items():
            self.say(f"skipping {name}: {why}")
        try:
            code = self._start(specs, self._launched + self.config.startup_timeout)
            if code is not None:
                return code
            self._print_endpoints(specs, skipped or {}, extra_endpoints or [])
            self.say(f"ready in {time.monotonic() - self._launched:.1f}s; Ctrl-C stops everything")
            return self._watch()
        finally:
            self._stop_children()

    def _start(self, specs: list[ServiceSpec], deadline: float) -> int | None:
        """Spawn each tier and wait for it; None once all serve, else the exit status."""
        busy = ports_in_use(self.config.host, [p for spec in specs for p in spec.ports])
        if busy:
            self.say(f"port(s) {', '.join(map(str, busy))} already in use on {self.config.host}", error=True)
            return 1
        for tier in sorted({spec.tier for spec in specs}):
            members = [spec for spec in specs if spec.tier == tier]
            if not self._stop.is_set():
                for spec in members:
                    self._spawn(spec)
            code = self._wait_serving(members, deadline)
            if code is not None:
                return code
        return None

    def _wait_serving(self, pending: list[ServiceSpec], deadline: float) -> int | None:
        pending = list(pending)
        while True:
            if self._stop.is_set():
                self.say("interrupted during start-up; stopping")
                return 128 + self.stop_signal
            if self._report_exited(during="during start-up"):
                return 1
            for spec in [s for s in pending if is_ready(s)]:
                pid = self.children[spec.name][1].pid
                self.say(f"{spec.name} is serving at {spec.health_address} (pid {pid})")
                pending.remove(spec)
            if not pending:
                return None
            if time.monotonic() > deadline:
                for spec in pending:
                    self.say(
                        f"{spec.name} did not report SERVING at {spec.health_address} "
                        f"within --startup-timeout {self.config.startup_timeout:g}s",
                        error=True,
                    )
                    self._print_tail(spec.name)
                return 1
            self._stop.wait(0.25)

    def _spawn(self, spec: ServiceSpec, *, again: bool = False) -> None:
        log_path = Path(self.config.log_dir) / f"{spec.name}.log" if self.config.log_dir else None
        width = max(len(name) for name in ("executor", "tokenizer", "scheduler", "gateway"))
        child = ChildProcess(
            spec.name,
            spec.command,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            log_path=log_path,
            prefix=f"{spec.name:<{width}} | ",
            out=self.out,
            err=self.err,
            parent_death_signal=signal.SIGTERM,
        ).start()
        self.children[spec.name] = (spec, child)
        self._place(spec, child.pid)
        where = f", log {log_path}" if log_path else ""
        self.say(f"{'restarted' if again else 'started'} {spec.name} (pid {child.pid}{where})")

    def _place(self, spec: ServiceSpec, pid: int) -> None:
        """With --cpu-affinity the executor has its cores (it pins itself); every other
        service (Redis too) is pinned to the cores left, so none competes with the forward."""
        if not self.config.cpu_affinity or spec.name.split("-")[0] == "executor":
            return
        from pagedserve.common.cpus import available_cores, parse_cpu_list

        rest = sorted(set(available_cores()) - set(parse_cpu_list(self.config.cpu_affinity)))
        if rest:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(pid, rest)

    def _report_exited(self, during: str) -> bool:
        """If a child has exited, say which, how, and its last stderr lines; True if one had."""
        for name, (_, child) in self.children.items():
            code = child.poll()
            if code is not None:
                self.say(f"{name} {signal_name(code)} {during}; stopping the rest", error=True)
                self._print_tail(name)
                return True
        return False

    def _print_tail(self, name: str) -> None:
        tail = self.children[name][1].stderr_tail()
        if not tail:
            self.say(f"{name} wrote nothing to stderr", error=True)
            return
        self.say(f"last {len(tail)} lines of {name}'s stderr:", error=True)
        for line in tail:
            write_line(self.err, f"    {line}")

    def _print_endpoints(
        self, specs: list[ServiceSpec], skipped: dict[str, str], extra: list[tuple[str, str]]
    ) -> None:
        near = self.config.connect_host
        rows = []
        if "gateway" in self.children:
            rows.append(("HTTP", f"http://{hostport(near, self.config.http_port)}"))
            rows.append(("gRPC", hostport(near, self.config.grpc_port)))
        for spec in specs:
            where = f"redis://{spec.health_address}/0" if spec.probe == "redis" else spec.health_address
            rows.append((spec.name, f"{where} (pid {self.children[spec.name][1].pid})"))
        rows.extend(extra)
        for name, why in skipped.items():
            rows.append((name, f"skipped: {why}"))
        if self.config.log_dir:
            rows.append(("logs", self.config.log_dir))
        self.say("endpoints")
        for label, value in rows:
            write_line(self.out, f"    {label:<10} {value}")

    def _watch(self) -> int:
        """Until a stop request: restart children that die (or, with --no-restart, return 1
        at the first death), each after its backoff; report restarted ones serving again."""
        while not self._stop.wait(WATCH_INTERVAL):
            for name, (spec, child) in list(self.children.items()):
                if name in self._restart_due:
                    if time.monotonic() >= self._restart_due[name]:
                        del self._restart_due[name]
                        self._not_ready_again.add(name)
                        self._spawn(spec, again=True)
                elif (code := child.poll()) is not None:
                    if not self._schedule_restart(name, child, code):
                        return 1
                elif name in self._not_ready_again and is_ready(spec):
                    self._not_ready_again.discard(name)
                    self.say(f"{name} is serving again at {spec.health_address} (pid {child.pid})")
        return 0

    def _schedule_restart(self, name: str, child: ChildProcess, code: int) -> bool:
        """Report a child's death and set when it starts again; False to give up instead."""
        how = f"{name} {signal_name(code)}"
        how += " before serving again" if name in self._not_ready_again else " while serving"
        if not self.config.restart:
            self.say(f"{how}; stopping the rest (--no-restart)", error=True)
            self._print_tail(name)
            return False
        history = self._restarts.setdefault(name, RestartHistory(self.config.restart_policy))
        now = time.monotonic()
        delay = history.schedule(now)
        if delay is None:
            policy = history.policy
            self.say(
                f"{how}; it was restarted {policy.max_restarts} times within {policy.window:g}s "
                f"(--max-restarts {policy.max_restarts}, --restart-window {policy.window:g}); "
                "stopping everything",
                error=True,
            )
            self._print_tail(name)
            return False
        self.say(
            f"{how}; restarting it in {delay:g}s "
            f"(restart {history.recent(now)} of at most {history.policy.max_restarts} "
            f"within {history.policy.window:g}s)",
            error=True,
        )
        self._print_tail(name)
        # No double start: the old leader is reaped (poll), and what it started is gone too,
        # before the new one may bind the same ports.
        if not child.reap(REAP_TIMEOUT):
            self.say(f"some process of {name}'s group is still there after {REAP_TIMEOUT:g}s", error=True)
        self._restart_due[name] = now + delay
        return True

    def _stop_children(self) -> None:
        if not self.children:
            return
        # Reverse start order, a tier at a time: the gateway stops taking requests before
        # the scheduler and executor it relies on go away.
        for tier in sorted({spec.tier for spec, _ in self.children.values()}, reverse=True):
            members = [(spec, child) for spec, child in self.children.values() if spec.tier == tier]
            running = [spec.name for spec, child in members if child.poll() is None]
            if running:
                self.say(f"stopping {', '.join(running)}")
            stop_all([child for _, child in members], self.config.stop_timeout, self._hurry)
        for _, child in self.children.values():
            child.close()


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = LauncherConfig.__dataclass_fields__
    parser.add_argument(
        "--model", default=default_model(), help="local path or hub id (default: %(default)s)"
    )
    where = parser.add_argument_group("addresses")
    where.add_argument(
        "--host", default=d["host"].default, help="interface every service binds (default: %(default)s)"
    )
    for flag, what in [
        ("http-port", "the gateway's HTTP"),
        ("grpc-port", "the gateway's gRPC"),
        ("tokenizer-port", "the tokenizer"),
        ("scheduler-port", "the scheduler"),
        ("executor-port", "the executor"),
    ]:
        default = d[flag.replace("-", "_")].default
        where.add_argument(
            f"--{flag}",
            type=int,
            default=default,
            metavar="PORT",
            help=f"port of {what} (default: %(default)s)",
        )
    where.add_argument(
        "--redis-url", default=None, metavar="URL",
        help="use this Redis instead of starting one (redis://, rediss://, redis+sentinel://, redis+cluster://)",
    )  # fmt: skip
    tls = parser.add_argument_group("mutual TLS between the services")
    tls.add_argument("--internal-tls", action="store_true",
                     help="make a throwaway CA and certificate with openssl and have every service use them")  # fmt: skip
    for name, what in (("cert", "certificate every service serves and presents"), ("key", "its private key"),
                       ("ca", "CA the services check each other against")):  # fmt: skip
        tls.add_argument(f"--internal-tls-{name}", default=None, metavar="PATH", help=f"or: the {what} (PEM)")
    kv = parser.add_argument_group("KV cache and batching (unset: the service's default)")
    kv.add_argument(
        "--block-size",
        type=_positive_int,
        default=d["block_size"].default,
        metavar="N",
        help="tokens per KV block",
    )
    pool = kv.add_mutually_exclusive_group()
    pool.add_argument(
        "--num-kv-blocks", type=_positive_int, default=None, metavar="N", help="blocks in the KV pool"
    )
    pool.add_argument(
        "--kv-cache-memory",
        type=parse_byte_size,
        default=None,
        metavar="BYTES",
        help="KV pool size, e.g. 2GiB (4g = 4GiB; 4GB = 4 x 10^9)",
    )
    kv.add_argument("--max-num-seqs", type=_positive_int, default=None, metavar="N")
    kv.add_argument("--max-num-batched-tokens", type=_positive_int, default=None, metavar="N")
    kv.add_argument("--max-model-len", type=_positive_int, default=None, metavar="N")
    kv.add_argument("--max-queued-requests", type=_positive_int, default=None, metavar="N")
    kv.add_argument("--cpu-threads", type=_positive_int, default=None, metavar="N",
                    help="the executor's torch threads (default: one per --cpu-affinity core, else all cores but one)")  # fmt: skip
    kv.add_argument("--cpu-affinity", default=None, metavar="CORES",
                    help="pin the executor to these cores, e.g. 1 or 2-3 (the other services keep the rest)")  # fmt: skip
    kv.add_argument("--enforce-eager", action="store_true",
                    help="on CUDA: no CUDA graphs of decode steps (captured by default) and no --compile")  # fmt: skip
    kv.add_argument(
        "--swap-space",
        type=float,
        default=None,
        metavar="GIB",
        help="the executor's CPU swap space in GiB (default: 4 on CUDA, 0 on CPU)",
    )
    kv.add_argument(
        "--preemption-mode",
        choices=["auto", "recompute", "swap"],
        default=None,
        help="how the scheduler preempts when blocks run out (default: auto)",
    )
    kv.add_argument("--compile", action="store_true",
                    help="run the executor's forward through torch.compile (slower start, faster steps)")  # fmt: skip
    kv.add_argument("--pools", type=_positive_int, default=1, metavar="N",
                    help="executor + scheduler pairs on one Redis (pool i > 0: executor and scheduler ports + 100 * i); "
                    "the gateway routes over them by what their caches hold")  # fmt: skip
    kv.add_argument("--served-model-name", nargs="+", default=(), metavar="NAME",
                    help="names clients may use for the model (default: --model as given); the first is reported")  # fmt: skip
    kv.add_argument("--stall-timeout", type=float, default=None, metavar="SECONDS",
                    help="seconds a request may make no progress while a service is away (default: 30)")  # fmt: skip
    kv.add_argument("--scheduler-stream", choices=["shared", "per-request"], default=None,
                    help="the gateway's requests on one stream to each scheduler (shared, the default) "
                    "or a stream each (per-request, for comparison)")  # fmt: skip
    kv.add_argument("--attention-backend", choices=["torch", "triton"], default=None)
    kv.add_argument("--dtype", default=None, help="model dtype, e.g. float32, bfloat16")
    run = parser.add_argument_group("running")
    run.add_argument("--startup-timeout", type=float, default=d["startup_timeout"].default, metavar="SECONDS",
                     help="seconds for every service to report SERVING (default: %(default)s)")  # fmt: skip
    run.add_argument("--stop-timeout", type=float, default=d["stop_timeout"].default, metavar="SECONDS",
                     help="seconds between SIGTERM and SIGKILL when stopping (default: %(default)s)")  # fmt: skip
    run.add_argument(
        "--log-dir", default=None, metavar="DIR", help="write each service's output to DIR/<service>.log"
    )
    supervise = parser.add_argument_group("restarting a service that dies once the stack is ready")
    supervise.add_argument("--no-restart", dest="restart", action="store_false",
                           help="stop everything (exit 1) when a service dies, instead of restarting it")  # fmt: skip
    supervise.add_argument("--max-restarts", type=_non_negative_int, default=d["max_restarts"].default, metavar="N",
                           help="restarts of one service within --restart-window before stopping everything "
                                "(default: %(default)s)")  # fmt: skip
    supervise.add_argument("--restart-window", type=float, default=d["restart_window"].default, metavar="SECONDS",
                           help="the window --max-restarts counts in (default: %(default)s)")  # fmt: skip


def main(args: argparse.Namespace) -> int:
    try:
        config = LauncherConfig.from_args(args)
    except ValueError as exc:
        print(f"pagedserve up: {exc}", file=sys.stderr)
        return 2
    launcher = Launcher(config)
    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {
        sig: signal.signal(sig, lambda signum, _frame: launcher.request_stop(signum)) for sig in stop_signals
    }
    try:
        return launcher.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
