"""Executor micro-benchmark: decode step time against batch size, and prefill throughput.

    python -m pagedserve.bench.executor_bench [--model M] [--device cpu] [--quick]

Drives `ExecutorEngine.execute_step` directly (no gRPC): the timed figure is what a scheduler's
step costs on the executor — validation, input packing, the forward and sampling. Each backend
gets its own engine; "triton" is measured only where it is usable for timing (a CUDA device; on
CPU it runs only under the Triton interpreter). Prints markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence

import torch

from pagedserve.common.models import default_model
from pagedserve.common.params import SamplingParams
from pagedserve.common.step import CachedRequestData, NewRequestData, StepInput
from pagedserve.executor.config import ExecutorConfig
from pagedserve.executor.engine import ExecutorEngine
from pagedserve.executor.model_runner import resolve_dtype
from pagedserve.executor.placement import keep_freed_memory
from pagedserve.kernels.cpu_native import ENV_SWITCH as NATIVE_SWITCH
from pagedserve.kernels.packed_gemm import ENV_SWITCH as PACKED_SWITCH

GREEDY = SamplingParams(temperature=0.0, max_tokens=1 << 20)
FULL_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
QUICK_BATCH_SIZES = (1, 4, 16, 64)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Bench:
    """One engine; requests get consecutive blocks (the layout does not change the cost)."""

    def __init__(self, engine: ExecutorEngine) -> None:
        self.engine = engine
        self.block_size = engine.pool.block_size
        self.vocab = engine.runner.vocab_size
        self.next_block = 0
        self.step_id = 0
        self.rng = random.Random(0)

    def _step(self, **parts) -> float:
        step = StepInput(self.step_id, self.engine.epoch, **parts)
        self.step_id += 1
        if self.engine.runner.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        self.engine.execute_step(step)
        if self.engine.runner.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def reset(self) -> None:
        self._step(forget_request_ids=list(self.engine.requests))
        self.next_block = 0

    def prefill(
        self,
        num_seqs: int,
        prompt_len: int,
        total_len: int,
        max_tokens: int,
        min_prompt_len: int | None = None,
    ) -> float:
        """Adds num_seqs requests with blocks for total_len tokens; prefills them in steps of at most
        max_tokens tokens (whole prompts per step); returns the seconds spent. With min_prompt_len,
        prompt lengths are drawn uniformly from [min_prompt_len, prompt_len] (a mixed decode batch)."""
        blocks_per_seq = cdiv(total_len, self.block_size)
        lengths = [
            prompt_len if min_prompt_len is None else self.rng.randint(min_prompt_len, prompt_len)
            for _ in range(num_seqs)
        ]
        seconds = 0.0
        while lengths:
            new = []
            budget = max_tokens
            while lengths and (not new or lengths[0] <= budget):
                n = lengths.pop(0)
                budget -= n
                blocks = list(range(self.next_block, self.next_block + blocks_per_seq))
                self.next_block += blocks_per_seq
                prompt = [self.rng.randrange(self.vocab) for _ in range(n)]
                new.append(
                    NewRequestData(
                        f"r{len(self.engine.requests) + len(new)}", prompt, [], GREEDY, blocks, 0, n
                    )
                )
            seconds += self._step(new_requests=new)
        return seconds

    def decode(self, num_steps: int) -> list[float]:
        """One token for every held request per step; returns each step's seconds."""
        times = []
        for _ in range(num_steps):
            cached = [
                CachedRequestData(rid, [], 1, r.num_computed_tokens)
                for rid, r in self.engine.requests.items()
            ]
            times.append(self._step(cached_requests=cached))
        return times


# "torch-gather": the torch backend without the native CPU decode kernel (kernels/cpu_native.py);
# "torch-unpacked": without the packed linears (kernels/packed_gemm.py); each for a side-by-side row.
# "triton" serves decode steps from CUDA graphs, as the executor does on a GPU; "triton-eager" is
# the same with --enforce-eager. "transformers" is the peer: the model's own forward and KV cache.
VARIANT_ENV = {
    "torch": {},
    "torch-gather": {NATIVE_SWITCH: "0"},
    "torch-unpacked": {PACKED_SWITCH: "0"},
    "triton": {},
    "triton-eager": {},
    "transformers": {},
}
BENCH_BACKENDS = tuple(VARIANT_ENV)


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """os.environ with `values` set for the block (the switches are read when a step is planned
    and when a model loads)."""
    old = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def usable_backends(requested: Sequence[str], device: torch.device) -> tuple[list[str], list[str]]:
    usable, notes = [], []
    for name in requested:
        if name.startswith("triton") and device.type != "cuda":
            notes.append(f"{name}: not measured on CPU (it runs there only under the Triton interpreter)")
        else:
            usable.append(name)
    return usable, notes


def run_backend(
    args: argparse.Namespace,
    backend: str,
    device: torch.device,
    batch_sizes: Sequence[int],
    decode_steps: int,
    warmup: int,
    num_blocks: int,
    total_len: int,
) -> tuple[dict[int, float], float]:
    """One backend's decode step seconds per batch size (median) and prefill tokens/s (best of three)."""
    if backend == "transformers":
        return run_transformers(args, device, batch_sizes, decode_steps, warmup)
    config = ExecutorConfig(
        model=args.model,
        device=str(device),
        attention_backend="triton" if backend.startswith("triton") else "torch",
        enforce_eager=backend == "triton-eager",
        dtype=args.dtype,
        block_size=args.block_size,
        num_kv_blocks=num_blocks,
        max_model_len=max(total_len, args.prefill_len + 1),  # what the pool is sized for
        max_num_batched_tokens=max(args.prefill_len, 8192),
        cpu_threads=args.threads or None,  # None: the executor's own default, as it serves
        compile=args.compile,
    )
    bench = Bench(ExecutorEngine.from_config(config))
    prefill = []
    for _ in range(1 if args.quick else 3):
        prefill.append(bench.prefill(1, args.prefill_len, args.prefill_len + 1, args.prefill_len))
        bench.reset()
    decode = {}
    for batch in batch_sizes:
        bench.prefill(batch, args.prompt_len, total_len, max_tokens=8192, min_prompt_len=args.min_prompt_len)
        bench.decode(warmup)
        decode[batch] = statistics.median(bench.decode(decode_steps))
        bench.reset()
        print(f"{backend} batch {batch}: {decode[batch] * 1e3:.2f} ms/step", file=sys.stderr)
    return decode, args.prefill_len / min(prefill)


def run_transformers(
    args: argparse.Namespace, device: torch.device, batch_sizes: Sequence[int], decode_steps: int, warmup: int
) -> tuple[dict[int, float], float]:
    """The same figures from transformers' own forward and KV cache, as a static batch: `batch`
    prompts of --prompt-len tokens prefilled together, then one step is the model on the last
    tokens with the cache, a greedy pick and the tokens on the host (what a step of `generate` does)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    checkpoint_dtype = getattr(AutoConfig.from_pretrained(args.model), "dtype", None)
    dtype = resolve_dtype(args.dtype, device, checkpoint_dtype)  # as the executor picks it
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    gen = torch.Generator().manual_seed(0)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def prompts(batch: int, length: int) -> torch.Tensor:
        return torch.randint(3, model.config.vocab_size, (batch, length), generator=gen).to(device)

    prefill = []
    decode = {}
    with torch.inference_mode():
        for _ in range(1 if args.quick else 3):
            ids = prompts(1, args.prefill_len)
            sync()
            start = time.perf_counter()
            model(ids, use_cache=True).logits[:, -1].argmax(-1).tolist()
            sync()
            prefill.append(time.perf_counter() - start)
        for batch in batch_sizes:
            out = model(prompts(batch, args.prompt_len), use_cache=True)
            cache, next_ids = out.past_key_values, out.logits[:, -1].argmax(-1)  # [B]
            times = []
            for i in range(warmup + decode_steps):
                sync()
                start = time.perf_counter()
                out = model(next_ids[:, None], past_key_values=cache, use_cache=True)
                next_ids = out.logits[:, -1].argmax(-1)
                next_ids.tolist()
                sync()
                if i >= warmup:
                    times.append(time.perf_counter() - start)
            decode[batch] = statistics.median(times)
            del out, cache
            print(f"transformers batch {batch}: {decode[batch] * 1e3:.2f} ms/step", file=sys.stderr)
    return decode, args.prefill_len / min(prefill)


def run(args: argparse.Namespace) -> str:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        keep_freed_memory()  # as `pagedserve executor` does on CPU
    batch_sizes = QUICK_BATCH_SIZES if args.quick else tuple(args.batch_sizes)
    decode_steps = 3 if args.quick else args.decode_steps
    warmup = 1 if args.quick else 2
    total_len = args.prompt_len + warmup + decode_steps
    num_blocks = (
        max(batch_sizes) * cdiv(total_len, args.block_size) + cdiv(args.prefill_len, args.block_size) + 1
    )
    backends, notes = usable_backends(args.backends, device)
    load_average = os.getloadavg()[0]
    decode_rows: dict[str, dict[int, float]] = {}
    prefill_rows: dict[str, float] = {}
    for backend in backends:
        with environment(VARIANT_ENV[backend]):
            decode_rows[backend], prefill_rows[backend] = run_backend(
                args, backend, device, batch_sizes, decode_steps, warmup, num_blocks, total_len
            )

    prompt_desc = (
        str(args.prompt_len) if args.min_prompt_len is None else f"{args.min_prompt_len}-{args.prompt_len}"
    )
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    lines = [
        f"model `{args.model}`, device {device}{gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads "
        f"(load average {load_average:.1f} on {os.cpu_count()} CPUs at start), "
        f"block size {args.block_size}, prompt {prompt_desc} tokens, {decode_steps} timed decode steps "
        f"after {warmup} warm-up, {'compiled' if args.compile else 'eager'}"
        + (
            f"; transformers: a static batch of {args.prompt_len}-token prompts and its own KV cache"
            if "transformers" in backends
            else ""
        ),
        "",
    ]
    lines.append("| batch | " + " | ".join(f"{b} ms/step | {b} tokens/s" for b in backends) + " |")
    lines.append("|---:|" + "---:|---:|" * len(backends))
    for batch in batch_sizes:
        cells = [f"{decode_rows[b][batch] * 1e3:.2f} | {batch / decode_rows[b][batch]:.0f}" for b in backends]
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    lines += ["", f"| prefill ({args.prefill_len} tokens, 1 sequence) | tokens/s |", "|---|---:|"]
    lines += [f"| {b} | {prefill_rows[b]:.0f} |" for b in backends]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=default_model())
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["torch", "triton"],
        choices=BENCH_BACKENDS,
        help="torch-gather: the torch backend without the native CPU decode kernel (decodes "
        "gathered and attended with SDPA); torch-unpacked: without the packed linears (F.linear); "
        "each for a side-by-side row",
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=list(FULL_BATCH_SIZES))
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128, help="context of each decoding sequence")
    parser.add_argument(
        "--min-prompt-len",
        type=int,
        default=None,
        help="draw each decoding sequence's context from [this, --prompt-len] (default: all --prompt-len)",
    )
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=10)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (default: the executor's --cpu-threads default)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the forward (executor --compile)"
    )
    parser.add_argument("--quick", action="store_true", help="batch sizes 1,4,16,64 and few steps")
    args = parser.parse_args(argv)
    # the engine's start-up lines (CUDA graph capture, compile) on stderr, as the executor logs them
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("pagedserve.executor.engine").setLevel(logging.INFO)
    if args.min_prompt_len is not None and not 1 <= args.min_prompt_len <= args.prompt_len:
        parser.error(f"--min-prompt-len must be in [1, --prompt-len={args.prompt_len}]")
    print(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
