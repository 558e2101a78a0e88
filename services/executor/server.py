"""`pagedserve executor`: load the model, allocate the KV pool, serve `pagedserve.v1.Executor`."""

from __future__ import annotations

import argparse
import logging

from pagedserve.common import event_loop, internal_tls
from pagedserve.common.cpus import parse_cpu_list
from pagedserve.common.grpc_utils import GrpcServer, run_until_signal
from pagedserve.common.logs import setup_logging
from pagedserve.common.models import default_model
from pagedserve.common.sizes import parse_byte_size
from pagedserve.executor.config import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_GPU_MEMORY_UTILIZATION,
    DEFAULT_PORT,
    ExecutorConfig,
)
from pagedserve.executor.engine import ExecutorEngine
from pagedserve.executor.placement import keep_freed_memory
from pagedserve.executor.servicer import SERVICE_NAME, ExecutorServicer
from pagedserve.kernels.backends import BACKEND_NAMES
from pagedserve.v1 import executor_pb2_grpc

log = logging.getLogger(__name__)

# The name the executor's tests call it by; the parser itself is shared with `pagedserve up`.
parse_bytes = parse_byte_size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help=f"local path or hub id (default: {default_model()})")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="tokens per KV block")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--num-kv-blocks", type=int, default=None, help="blocks in the KV pool")
    size.add_argument(
        "--kv-cache-memory",
        type=parse_byte_size,
        default=None,
        help="bytes for the KV pool (e.g. 2GiB; 4g = 4GiB, 4GB = 4 x 10^9)",
    )
    parser.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=DEFAULT_GPU_MEMORY_UTILIZATION,
        help="CUDA: fraction of device memory for weights, activations and the pool (when no size is given)",
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="longest prompt + output (default: the model's, capped)",
    )
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="most tokens in one step")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument(
        "--attention-backend",
        default=None,
        choices=list(BACKEND_NAMES),
        help="default: triton on CUDA, else torch",
    )
    parser.add_argument(
        "--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cuda when available)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the generator shared by unseeded requests"
    )
    parser.add_argument(
        "--cpu-threads",
        type=int,
        default=None,
        help="torch threads (default on CPU: one per --cpu-affinity core, else all cores but one, min 1)",
    )
    parser.add_argument(
        "--prefill-threads",
        type=int,
        default=None,
        help="torch threads for a step of 256+ tokens (prefill-heavy: the other services have little "
        "to do meanwhile); default on CPU: every core the executor may run on; on CUDA: --cpu-threads",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model forward (inductor; start-up pays tens of seconds on CPU; default: eager)",
    )
    parser.add_argument(
        "--enforce-eager",
        action="store_true",
        help="on CUDA: no CUDA graphs of decode steps (captured at start-up by default) and no --compile",
    )
    parser.add_argument(
        "--swap-space",
        type=float,
        default=None,
        metavar="GIB",
        help="GiB of CPU blocks for swap preemption (pinned on CUDA; default: 4 on CUDA, capped at a "
        "quarter of host memory; 0 on CPU)",
    )
    parser.add_argument(
        "--cpu-affinity",
        type=_cpu_list,
        default=None,
        help="pin the executor to these cores, e.g. 0 or 0,2-3 (default: not pinned)",
    )
    internal_tls.add_arguments(parser)


def _cpu_list(text: str) -> tuple[int, ...]:
    try:
        return parse_cpu_list(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def config_from_args(args: argparse.Namespace) -> ExecutorConfig:
    return ExecutorConfig(
        model=args.model or default_model(),
        host=args.host,
        port=args.port,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        dtype=args.dtype,
        attention_backend=args.attention_backend,
        device=args.device,
        seed=args.seed,
        cpu_threads=args.cpu_threads,
        prefill_threads=args.prefill_threads,
        cpu_affinity=args.cpu_affinity,
        compile=args.compile,
        enforce_eager=args.enforce_eager,
        swap_space=args.swap_space,
    )


async def start_server(engine: ExecutorEngine, host: str, port: int) -> GrpcServer:
    """Starts serving `engine`; returns the server (its `bound_port` is the port in use)."""
    servicer = ExecutorServicer(engine)
    try:
        await servicer.warm_up()  # before serving: a ready executor is a warm one
        server = GrpcServer(host, port, tls=internal_tls.active())
        server.add(executor_pb2_grpc.add_ExecutorServicer_to_server, servicer, SERVICE_NAME)
        server.on_stop(servicer.close)
        await server.start()
    except BaseException:
        servicer.close()
        raise
    return server


async def serve(config: ExecutorConfig) -> None:
    engine = ExecutorEngine.from_config(config)
    if engine.runner.device.type == "cpu" and keep_freed_memory():  # for every step's activations
        log.info("malloc keeps freed memory for reuse (no mmap per activation)")
    server = await start_server(engine, config.host, config.port)
    log.info("executor serving on %s:%d (epoch %s)", config.host, server.bound_port, engine.epoch)
    await run_until_signal(server.stop)


def main(args: argparse.Namespace) -> int:
    setup_logging("executor")
    try:
        internal_tls.configure_from_args(args)
    except ValueError as e:
        log.error("%s", e)
        return 2
    try:
        config = config_from_args(args)
        config.validate()
    except ValueError as e:
        log.error("%s", e)
        return 2
    try:
        event_loop.run(serve(config))
    except ValueError as e:  # a model or pool that cannot work: say why, no traceback
        log.error("%s", e)
        return 1
    return 0
