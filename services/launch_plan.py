"""What `pagedserve up` starts: its configuration (`LauncherConfig`, from the flags in
`launch_args.py`) and the plan built from it — each service's command line, health address,
ports, needs and start tier (`plan`), pools past the first included."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

from pagedserve.cli import SUBCOMMANDS
from pagedserve.common import internal_tls
from pagedserve.common.chat_template import chat_template_is_file
from pagedserve.common.process import RestartPolicy
from pagedserve.gateway.config import check_request_limit, given_request_limits

PAGEDSERVE = (sys.executable, "-m", "pagedserve.cli")
_WILDCARD_HOSTS = ("", "0.0.0.0", "::")


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
    chat_template: str | None = None  # the tokenizer's --chat-template (a file or the Jinja text)
    generation_config: str | None = None  # the gateway's --generation-config (auto, vllm or a folder)
    allowed_origins: tuple[str, ...] = ()  # the gateway's --allowed-origins (CORS for these pages)
    api_key: str | None = None  # the gateway's --api-key, given in its environment, never on its command line
    protect_metrics: bool = False  # the gateway's --protect-metrics (/metrics behind the key too)
    request_timeout: float | None = None  # the gateway's --request-timeout (seconds end to end)
    reasoning_parser: str | None = None  # the gateway's --reasoning-parser (deepseek_r1, qwen3)
    stall_timeout: float | None = None  # the scheduler's and the gateway's --stall-timeout
    scheduler_stream: str | None = None  # the gateway's --scheduler-stream (default: shared)
    # the gateway's request limits that were given (flag, value): --max-n, --max-beam-width, ...
    gateway_limits: tuple[tuple[str, float], ...] = ()
    cpu_threads: int | None = None  # the executor's torch threads (default: its own)
    prefill_threads: int | None = None  # ... for prefill-heavy steps (default: its own)
    cpu_affinity: str | None = None  # cores the executor is pinned to, e.g. "1" or "2-3"
    compile: bool = False  # the executor's torch.compile'd forward
    enforce_eager: bool = False  # the executor's --enforce-eager (no CUDA graphs, no compile)
    swap_space: float | None = None  # the executor's --swap-space (GiB of CPU blocks)
    gpu_memory_utilization: float | None = None  # the executor's, on CUDA
    seed: int | None = None  # the executor's generator seed for unseeded requests
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
        if self.chat_template:
            chat_template_is_file(self.chat_template)  # a ValueError when it is neither
        for flag, value in self.gateway_limits:
            check_request_limit(flag, value)
        if self.internal_tls_cert or self.internal_tls_key or self.internal_tls_ca:
            internal_tls.load(self.internal_tls_cert, self.internal_tls_key, self.internal_tls_ca)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LauncherConfig:
        """The config from parsed flags; a field with no flag keeps its default."""
        given = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**given, gateway_limits=given_request_limits(args))

    @property
    def restart_policy(self) -> RestartPolicy:
        return RestartPolicy(
            self.max_restarts, self.restart_window, self.restart_backoff, self.restart_backoff_max
        )

    @property
    def connect_host(self) -> str:
        """Where the launcher and the services reach each other: loopback for a wildcard bind."""
        return "127.0.0.1" if self.host in _WILDCARD_HOSTS else self.host


def service_env(config: LauncherConfig, name: str) -> dict[str, str]:
    """What service `name` gets in its environment besides the launcher's own: unbuffered output,
    and for the gateway its --api-key (a command line is public to every user of the machine)."""
    env = {"PYTHONUNBUFFERED": "1"}
    if config.api_key and name == "gateway":
        env["PAGEDSERVE_API_KEY"] = config.api_key
    return env


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


def default_placement(
    config: LauncherConfig, cores: tuple[int, ...], cuda: Callable[[], bool]
) -> tuple[LauncherConfig, str]:
    """`pagedserve up`'s placement when no flag sets one, as vLLM places its CPU workers: on a
    machine without CUDA, with 2+ cores and one pool, the executor is pinned to every core but the
    last and the other services (Redis too) to the last, so they never preempt its one-thread-per-
    core forward; its heavy steps (--prefill-threads, default every core) spread over every core
    while they run. `--cpu-threads` or `--cpu-affinity` keeps what they say. `cuda` is asked last
    (it imports torch). Returns the config and a line for the log ("" when unchanged)."""
    if config.cpu_affinity or config.cpu_threads or config.pools != 1 or len(cores) < 2 or cuda():
        return config, ""
    from pagedserve.common.cpus import format_cpu_list

    executor, rest = format_cpu_list(cores[:-1]), format_cpu_list(cores[-1:])
    placed = replace(config, cpu_affinity=executor, prefill_threads=config.prefill_threads or len(cores))
    return placed, (
        f"the executor is pinned to cores {executor} and the other services to core {rest}; its heavy "
        f"steps use every core (--cpu-threads N keeps every process unpinned)"
    )


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


def _absolute_if_path(value: str | None) -> str | None:
    """A file or folder given relative to where `up` runs, made absolute for the services."""
    return (
        os.path.abspath(value) if value and value not in ("auto", "vllm") and os.path.exists(value) else value
    )


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
          *_opt("--cpu-threads", config.cpu_threads),
          *_opt("--prefill-threads", config.prefill_threads), *_opt("--cpu-affinity", config.cpu_affinity),
          *_opt("--swap-space", config.swap_space),
          *_opt("--gpu-memory-utilization", config.gpu_memory_utilization), *_opt("--seed", config.seed),
          *(("--compile",) if config.compile else ()),
          *(("--enforce-eager",) if config.enforce_eager else ()))),
        ("tokenizer", (), (config.tokenizer_port,),
         ("--host", host, "--port", str(config.tokenizer_port), *model,
          *_opt("--chat-template", _absolute_if_path(config.chat_template or None)))),
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
          *_opt("--generation-config", _absolute_if_path(config.generation_config)),
          *(("--allowed-origins", *config.allowed_origins) if config.allowed_origins else ()),
          *_opt("--stall-timeout", config.stall_timeout), *_opt("--scheduler-stream", config.scheduler_stream),
          *_opt("--request-timeout", config.request_timeout), *_opt("--reasoning-parser", config.reasoning_parser),
          *(("--protect-metrics",) if config.protect_metrics else ()),
          *(str(x) for pair in config.gateway_limits for x in pair))),
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


def service_ports(config: LauncherConfig) -> set[int]:
    """Every port the planned services listen on, `--pools` ports included."""
    return {port for spec in plan(config, "redis://127.0.0.1:0/0").specs for port in spec.ports}


def cuda_available() -> bool:
    import torch  # here, not at the top: the launcher needs it for this question only

    return torch.cuda.is_available()
