"""The flags of `pagedserve up` (see launcher.py for what it does with them)."""

from __future__ import annotations

import argparse

from pagedserve.common.models import default_model
from pagedserve.common.redis_connect import url_arg
from pagedserve.common.sizes import parse_byte_size
from pagedserve.gateway.config import add_request_limits
from pagedserve.gateway.reasoning import PARSERS
from pagedserve.launch_plan import LauncherConfig


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
        "--redis-url", type=url_arg, default=None, metavar="URL",
        help="use this Redis instead of starting one (redis://, rediss://, redis+sentinel://, redis+cluster://; "
        "env:NAME: the URL in environment variable NAME, out of sight of ps)",
    )  # fmt: skip
    add_request_limits(parser, defaults=False)
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
    kv.add_argument("--prefill-threads", type=_positive_int, default=None, metavar="N",
                    help="the executor's torch threads for a step of 256+ tokens (default on CPU: every core it may run on)")  # fmt: skip
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
    kv.add_argument("--allowed-origins", nargs="+", default=(), metavar="ORIGIN",
                    help="browser origins whose pages may call the HTTP API (CORS; default: none)")  # fmt: skip
    kv.add_argument("--api-key", default=None, metavar="KEY",
                    help="clients must send it as a bearer token, on HTTP /v1 and gRPC (default: "
                    "$PAGEDSERVE_API_KEY; none: open)")  # fmt: skip
    kv.add_argument(
        "--protect-metrics", action="store_true", help="with --api-key, /metrics needs the key too"
    )
    kv.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                    help="seconds a request may take end to end, at the gateway (default: none)")  # fmt: skip
    kv.add_argument("--reasoning-parser", choices=PARSERS, default=None,
                    help="the gateway splits a reasoning model's <think>...</think> into the chat "
                    "message's `reasoning` (default: off)")  # fmt: skip
    kv.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="FRACTION",
                    help="on CUDA: the executor's share of device memory for weights, activations and "
                    "the pool, when no pool size is given (default: 0.9)")  # fmt: skip
    kv.add_argument("--seed", type=int, default=None,
                    help="the executor's generator seed for requests without their own")  # fmt: skip
    kv.add_argument("--generation-config", default=None, metavar="auto|vllm|FOLDER",
                    help="the gateway's default sampling from generation_config.json (default: auto, the model's)")  # fmt: skip
    kv.add_argument("--chat-template", default=None, metavar="FILE_OR_TEXT",
                    help="a Jinja chat template in place of the model's own, for the tokenizer")  # fmt: skip
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
