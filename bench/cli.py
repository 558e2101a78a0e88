"""`pagedserve bench`: drive a stack with a load and report; `--suite` runs every scenario.

    pagedserve bench --gateway localhost:50051 --scheduler localhost:50053 --rate 4
    pagedserve bench --gateway localhost:50051 --metrics-url http://localhost:8000/metrics --max-concurrency 8
    pagedserve bench --launch --workload fixed --num-requests 8 --prompt-len 32 --output-len 16
    pagedserve bench --suite [--quick]      # every scenario and peer; writes docs/BENCHMARKS.md
    pagedserve bench --suite --peers vllm --vllm-only   # pagedserve vs vLLM only (its own section)
    pagedserve bench --hostile [--streams 200]   # 200 streams beside one client asking the most

A single run prints a markdown table (throughput, TTFT / TPOT / ITL percentiles, KV
utilization, preemptions, prefix-cache hit rate) and can write it and a JSON record.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from pagedserve.common.models import default_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", action="store_true", help="run every scenario and write the report")
    parser.add_argument(
        "--quick", action="store_true", help="the suite at tiny sizes (< 10 min on 2 cores); implies --suite"
    )
    parser.add_argument("--docs", default="docs/BENCHMARKS.md", help="--suite: the report to write")
    parser.add_argument("--results-dir", default="bench/results", help="--suite: where the JSON goes")
    parser.add_argument("--skip-peers", action="store_true", help="--suite: no peers at all")
    parser.add_argument(
        "--peers", default="transformers",
        help="--suite: peers to compare with, comma-separated: transformers (in process), vllm (vLLM's CPU "
             "build, installed into its own venv in the bench cache on first use; both traces on the bundled "
             "and a mid-size model)",
    )  # fmt: skip
    parser.add_argument(
        "--vllm-only", action="store_true",
        help="--suite: only the vLLM comparison (implies --peers vllm); rewrites only its section of --docs",
    )  # fmt: skip
    parser.add_argument(
        "--vllm-venv",
        default=None,
        help="--peers vllm: the venv to use or create (default: the bench cache's)",
    )
    parser.add_argument(
        "--hostile", nargs=argparse.REMAINDER, default=None, metavar="ARGS",
        help="the hostile-client benchmark instead (pagedserve.bench.hostile_bench; the rest of the "
             "line is its arguments, e.g. --streams 200 --output-len 8)",
    )  # fmt: skip
    target = parser.add_argument_group("target")
    target.add_argument("--gateway", default="localhost:50051", help="the gateway's gRPC address")
    target.add_argument(
        "--scheduler", default=None, help="the scheduler's address, for Stats (KV figures); optional"
    )
    target.add_argument(
        "--metrics-url", default=None, help="without --scheduler: the gateway's /metrics URL, for KV figures"
    )
    target.add_argument(
        "--launch", action="store_true", help="start a stack with `pagedserve up`, stop it after"
    )
    target.add_argument("--model", default=default_model())
    target.add_argument("--num-kv-blocks", type=int, default=256, help="--launch: KV pool blocks")
    target.add_argument("--block-size", type=int, default=16, help="--launch: tokens per block")
    target.add_argument("--max-model-len", type=int, default=512, help="--launch")
    target.add_argument("--max-num-seqs", type=int, default=256, help="--launch")
    load = parser.add_argument_group("workload and arrivals")
    load.add_argument(
        "--workload", choices=["sharegpt", "fixed", "shared-prefix", "jsonl"], default="sharegpt"
    )
    load.add_argument("--num-requests", type=int, default=32)
    load.add_argument("--prompt-median", type=float, default=64, help="sharegpt: median prompt tokens")
    load.add_argument("--output-median", type=float, default=32, help="sharegpt: median output tokens")
    load.add_argument(
        "--prompt-len", type=int, default=32, help="fixed / shared-prefix: prompt (user) tokens"
    )
    load.add_argument("--output-len", type=int, default=16, help="fixed / shared-prefix / jsonl default")
    load.add_argument("--system-len", type=int, default=256, help="shared-prefix: system prompt tokens")
    load.add_argument(
        "--jsonl", default=None, help="jsonl: a file of {prompt | prompt_token_ids, output_len}"
    )
    load.add_argument(
        "--rate", type=float, default=None, help="Poisson arrivals, requests/s (default: all at once)"
    )
    load.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    load.add_argument("--seed", type=int, default=0)
    out = parser.add_argument_group("output")
    out.add_argument("--output-json", default=None, help="write the run's figures and per-request records")
    out.add_argument("--output-md", default=None, help="write the markdown table")
    out.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def build_workload(args: argparse.Namespace, vocab_size: int = 4096):
    from pagedserve.bench import workload as w

    if args.workload == "sharegpt":
        return w.sharegpt_like(
            args.num_requests, vocab_size=vocab_size, max_model_len=args.max_model_len,
            prompt_median=args.prompt_median, output_median=args.output_median, seed=args.seed,
        )  # fmt: skip
    if args.workload == "fixed":
        return w.fixed_lengths(
            args.num_requests, vocab_size=vocab_size, prompt_len=args.prompt_len,
            output_len=args.output_len, seed=args.seed,
        )  # fmt: skip
    if args.workload == "shared-prefix":
        return w.shared_prefix(
            args.num_requests, vocab_size=vocab_size, system_len=args.system_len, user_len=args.prompt_len,
            output_len=args.output_len, seed=args.seed,
        )  # fmt: skip
    if not args.jsonl:
        raise SystemExit("--workload jsonl needs --jsonl FILE")
    return w.from_jsonl(args.jsonl, args.model, args.output_len)[: args.num_requests]


def single_run(args: argparse.Namespace) -> int:
    from pagedserve.bench.loadgen import run_load
    from pagedserve.bench.metrics import summarize, summary_dict
    from pagedserve.bench.report import run_table
    from pagedserve.bench.stack import LaunchedStack, StackConfig

    requests = build_workload(args)
    stack = None
    gateway, scheduler = args.gateway, args.scheduler
    if args.launch:
        config = StackConfig(
            args.model, args.num_kv_blocks, args.block_size, args.max_model_len, args.max_num_seqs
        )
        stack = LaunchedStack(config).start()
        gateway, scheduler = stack.gateway_address, stack.scheduler_address
    try:
        result = asyncio.run(
            run_load(gateway, requests, rate=args.rate, max_concurrency=args.max_concurrency,
                     scheduler_address=scheduler, metrics_url=args.metrics_url, seed=args.seed,
                     progress=not args.no_progress)
        )  # fmt: skip
    finally:
        if stack is not None:
            stack.stop()
    summary = summarize(result.records, result.samples)
    md = run_table(summary, result.preemptions, result.prefix_hit_rate)
    print(md)
    if args.output_md:
        Path(args.output_md).write_text(md + "\n")
    if args.output_json:
        record = {
            "summary": summary_dict(summary),
            "preemptions": result.preemptions,
            "prefix_hit_rate": result.prefix_hit_rate,
            "requests": [
                {"sent": r.sent, "finished": r.finished, "prompt_tokens": r.prompt_tokens,
                 "output_tokens": r.output_tokens, "ttft": r.ttft, "tpot": r.tpot, "error": r.error}
                for r in result.records
            ],
            "kv_samples": [s._asdict() for s in result.samples],
        }  # fmt: skip
        Path(args.output_json).write_text(json.dumps(record, indent=1, default=str) + "\n")
    return 0 if summary.num_failed == 0 else 1


def main(args: argparse.Namespace) -> int:
    if args.hostile is not None:
        from pagedserve.bench import hostile_bench

        parser = argparse.ArgumentParser(prog="pagedserve bench --hostile")
        hostile_bench.add_arguments(parser)
        return hostile_bench.main(parser.parse_args(args.hostile))
    if args.suite or args.quick:
        from pagedserve.bench.suite import run_suite

        return run_suite(args)
    return single_run(args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="pagedserve bench")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
