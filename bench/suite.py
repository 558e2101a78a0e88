"""`pagedserve bench --suite [--quick]`: every scenario, one after the other, and the report.

(a) throughput on a ShareGPT-like trace: transformers static batching, transformers continuous
    batching, pagedserve with a contiguous-style reservation (emulated), pagedserve as shipped;
(b) capacity of a fixed KV budget, paged vs contiguous reservation;
(c) sharing: blocks for n = 4 sampling and a shared system prompt, with and without sharing;
(d) control-plane time per step vs batch size (bench/scheduler_bench.py's measurement);
(e) TTFT / TPOT under Poisson load at several rates;
with `--peers vllm`, pagedserve vs vLLM on two traces and two models (bench/vllm_compare.py).
Writes docs/BENCHMARKS.md, docs/bench_*.png and bench/results/bench_<mode>.json (and bench_vllm.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pagedserve.bench import report
from pagedserve.bench.loadgen import LoadResult, run_load
from pagedserve.bench.metrics import RunSummary, summarize, summary_dict
from pagedserve.bench.stack import LaunchedStack, StackConfig
from pagedserve.bench.workload import BenchRequest, fixed_lengths, sharegpt_like


@dataclass(frozen=True, slots=True)
class SuiteSizes:
    num_requests: int
    prompt_median: float
    output_median: float
    max_model_len: int
    num_kv_blocks: int
    static_batch: int
    rates: tuple[float, ...]
    requests_per_rate: int
    capacity_requests: int
    control_steps: int
    block_size: int = 16
    max_num_batched_tokens: int = 2048


QUICK = SuiteSizes(64, 64, 64, 512, 128, 8, (2.0, 8.0, 32.0), 24, 128, 30)
FULL = SuiteSizes(128, 96, 96, 1024, 256, 16, (2.0, 8.0, 16.0, 32.0), 48, 256, 100)
VOCAB = 4096  # the bundled model's


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _load(stack: LaunchedStack, requests: list[BenchRequest], label: str, **kw) -> LoadResult:
    return asyncio.run(
        run_load(
            stack.gateway_address, requests, scheduler_address=stack.scheduler_address, label=label, **kw
        )
    )


def _warm_up(stack: LaunchedStack) -> None:
    """A few short requests first: the first forwards of a fresh executor are slow."""
    _load(stack, fixed_lengths(4, vocab_size=VOCAB, prompt_len=16, output_len=4, seed=99), "warm-up",
          progress=False)  # fmt: skip


def _stack_run(model: str, sizes: SuiteSizes, max_num_seqs: int, trace: list[BenchRequest], label: str,
               rates: tuple[float, ...] = ()) -> tuple[LoadResult, list[LoadResult]]:  # fmt: skip
    config = StackConfig(
        model, sizes.num_kv_blocks, sizes.block_size, sizes.max_model_len, max_num_seqs,
        sizes.max_num_batched_tokens,
    )  # fmt: skip
    say(f"{label}: starting `pagedserve up` (max_num_seqs {max_num_seqs}, {sizes.num_kv_blocks} blocks)")
    with LaunchedStack(config) as stack:
        _warm_up(stack)
        say(f"{label}: {len(trace)} requests, all at once")
        main = _load(stack, trace, label)
        by_rate = []
        for i, rate in enumerate(rates):
            reqs = sharegpt_like(
                sizes.requests_per_rate, vocab_size=VOCAB, max_model_len=sizes.max_model_len,
                prompt_median=sizes.prompt_median, output_median=sizes.output_median, seed=100 + i,
            )  # fmt: skip
            say(f"{label}: Poisson {rate:g} req/s, {len(reqs)} requests")
            by_rate.append(_load(stack, reqs, f"rate {rate:g}", rate=rate, seed=100 + i))
    return main, by_rate


def _machine() -> dict[str, object]:
    import torch

    load = os.getloadavg()
    return {
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": round(load[0], 2),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }


def selected_peers(args: argparse.Namespace) -> set[str]:
    """The --peers names (--skip-peers: none; --vllm-only: vllm alone)."""
    if args.vllm_only:
        return {"vllm"}
    if args.skip_peers:
        return set()
    names = {p.strip() for p in args.peers.split(",") if p.strip()}
    unknown = names - {"transformers", "vllm"}
    if unknown:
        raise SystemExit(f"--peers: unknown peer(s) {sorted(unknown)}; choose from transformers, vllm")
    return names


def run_vllm(args: argparse.Namespace) -> int:
    """pagedserve vs vLLM; writes bench/results/bench_vllm.json and the docs' vLLM section."""
    from pagedserve.bench.vllm_compare import run_vllm_comparison
    from pagedserve.bench.vllm_report import ratio_rows, write_vllm_section

    t_start = time.perf_counter()
    results = {"machine": _machine(), **run_vllm_comparison(Path(args.vllm_venv) if args.vllm_venv else None,
                                                            log=say, seed=args.seed)}  # fmt: skip
    results["wall_s"] = time.perf_counter() - t_start
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "bench_vllm.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    write_vllm_section(Path(args.docs), results)
    for model, trace, ours, theirs, ratio in ratio_rows(results):
        say(f"{model}, {trace}: pagedserve {ours:.0f} vs vLLM {theirs:.0f} output tok/s = {ratio:.2f}x")
    say(
        f"vLLM comparison done in {results['wall_s']:.0f}s; wrote {args.docs} and {results_dir / 'bench_vllm.json'}"
    )
    return 0


def run_suite(args: argparse.Namespace) -> int:
    from pagedserve.bench import accounting, peers

    chosen = selected_peers(args)
    if args.vllm_only:
        return run_vllm(args)
    sizes = QUICK if args.quick else FULL
    mode = "quick" if args.quick else "full"
    t_start = time.perf_counter()
    machine = _machine()
    say(f"suite ({mode}): {asdict(sizes)}; machine {machine}")
    trace = sharegpt_like(
        sizes.num_requests, vocab_size=VOCAB, max_model_len=sizes.max_model_len,
        prompt_median=sizes.prompt_median, output_median=sizes.output_median, seed=args.seed,
    )  # fmt: skip
    contiguous_seqs = max(1, sizes.num_kv_blocks * sizes.block_size // sizes.max_model_len)

    # (a) throughput: peers first, each alone on the machine.
    peer_results = []
    if "transformers" in chosen:
        say(f"transformers static batching (batch {sizes.static_batch})")
        peer_results.append(peers.hf_static(args.model, trace, sizes.static_batch))
        say("transformers continuous batching")
        peer_results.append(
            peers.hf_continuous(args.model, trace, block_size=sizes.block_size, num_blocks=sizes.num_kv_blocks,
                                max_batch_tokens=sizes.max_num_batched_tokens)
        )  # fmt: skip
        for p in peer_results:
            say(f"{p.name}: {report.fmt(p.output_throughput)} output tok/s {p.error}")
    contiguous, _ = _stack_run(
        args.model, sizes, contiguous_seqs, trace, "pagedserve, contiguous reservation"
    )
    shipped, by_rate = _stack_run(args.model, sizes, 256, trace, "pagedserve", sizes.rates)

    # (b), (c), (d): the scheduler alone.
    say("capacity and sharing (scheduler accounting)")
    cap_trace = sharegpt_like(
        sizes.capacity_requests, vocab_size=VOCAB, max_model_len=sizes.max_model_len,
        prompt_median=sizes.prompt_median, output_median=sizes.output_median, seed=args.seed + 1,
    )  # fmt: skip
    cap = accounting.capacity(
        cap_trace,
        num_blocks=sizes.num_kv_blocks,
        block_size=sizes.block_size,
        max_model_len=sizes.max_model_len,
    )
    share = accounting.sharing(
        vocab_size=VOCAB, block_size=sizes.block_size, num_blocks=4096, max_model_len=sizes.max_model_len,
        prompt_len=sizes.max_model_len // 2, output_len=64, system_len=sizes.max_model_len // 2, num_users=8,
        user_len=32,
    )  # fmt: skip
    say(f"control plane ({sizes.control_steps} steps per batch size, real Redis)")
    control = _control_plane(sizes)

    results = {
        "mode": mode,
        "machine": machine,
        "sizes": asdict(sizes),
        "peers": [p._asdict() | {"output_throughput": p.output_throughput} for p in peer_results],
        "contiguous": _load_json(contiguous),
        "shipped": _load_json(shipped),
        "by_rate": [{"rate": r, **_load_json(x)} for r, x in zip(sizes.rates, by_rate, strict=True)],
        "capacity": {k: (v._asdict() if hasattr(v, "_asdict") else v) for k, v in cap._asdict().items()},
        "sharing": [row._asdict() for row in share],
        "control_plane": control,
        "contiguous_max_num_seqs": contiguous_seqs,
        "wall_s": None,
    }
    results["wall_s"] = time.perf_counter() - t_start
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"bench_{mode}.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    from pagedserve.bench.suite_report import write_report

    write_report(Path(args.docs), results, peer_results, contiguous, shipped, by_rate, cap, share, sizes)
    say(f"done in {results['wall_s']:.0f}s; wrote {args.docs} and {results_dir / f'bench_{mode}.json'}")
    return run_vllm(args) if "vllm" in chosen else 0


def _load_json(result: LoadResult) -> dict[str, object]:
    summary: RunSummary = summarize(result.records, result.samples)
    return {
        "summary": summary_dict(summary),
        "preemptions": result.preemptions,
        "prefix_hit_rate": result.prefix_hit_rate,
        "kv_samples": [list(s) for s in result.samples[:: max(1, len(result.samples) // 200)]],
    }


def _control_plane(sizes: SuiteSizes) -> list[dict[str, float]]:
    import uuid

    import redis

    from pagedserve.bench.scheduler_bench import EXECUTOR_MS, CountingRedis, control_plane, exposed_control
    from pagedserve.common.redis_harness import RedisServer
    from pagedserve.scheduler.redis_pool import RedisBlockPool

    server = RedisServer(prefer_docker=False).start()
    try:
        client = redis.Redis.from_url(server.url)
        counter = CountingRedis(client)
        rows = []
        for batch in (1, 16, 64, 256):
            res = asyncio.run(
                control_plane(RedisBlockPool(client, f"bench-cp-{uuid.uuid4().hex[:8]}"), batch,
                              steps=sizes.control_steps, block_size=sizes.block_size, num_blocks=16384,
                              count_round_trips=lambda: counter.count)
            )  # fmt: skip
            exposed = asyncio.run(
                exposed_control(RedisBlockPool(client, f"bench-ex-{uuid.uuid4().hex[:8]}"), batch,
                                steps=sizes.control_steps, block_size=sizes.block_size, num_blocks=16384,
                                executor_ms=EXECUTOR_MS)
            )  # fmt: skip
            rows.append(
                {
                    "batch": batch,
                    **res,
                    "exposed_p50_ms": exposed["p50_ms"],
                    "exposed_p90_ms": exposed["p90_ms"],
                }
            )
        client.close()
        return rows
    finally:
        server.stop()
