"""KV blocks with and without sharing inside a request: beam search and parallel sampling.

    python -m pagedserve.bench.sharing_bench [--requests 6] [--widths 2 4 6] [--docs docs/BENCHMARKS.md]

The scheduler runs in this process over a real Redis (a throwaway `redis-server`) and drives a
real `ExecutorEngine` on the bundled model (CPU unless a GPU is there). Two traces of random
token ids: Alpaca-like (short prompts, ~60-token answers) and ShareGPT-like (longer prompts and
answers, outputs capped). Each mode runs a trace's requests all at once on a fresh pool large
enough that nothing is preempted: beam search of width w (greedy scores, the model's own EOS
ends a beam, so outputs end as they end) and parallel sampling of n seeded choices
(temperature 1.0, `ignore_eos`, each choice the trace's output length).

Before every step, for every request holding blocks: with sharing = the distinct blocks in its
sequences' tables; without = the sum of those tables' lengths (each beam or choice holding its
own full copy, the same slots at the same moment). Saving = 1 - sum(with) / sum(without) over
the steps (time-integrated, as the PagedAttention paper reports it); the peak is the largest
per-step total. The figure is about sharing within a request: requests never share with each
other here (random prompts), so running them together only changes the wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from pagedserve.bench.sharing_report import PAPER_JSON, print_table, section, write_section
from pagedserve.bench.workload import BenchRequest, alpaca_like, sharegpt_like
from pagedserve.common.params import SamplingParams
from pagedserve.common.sizes import cdiv
from pagedserve.common.step import StepInput, StepOutput
from pagedserve.executor.client import InProcessExecutorClient
from pagedserve.executor.config import ExecutorConfig
from pagedserve.executor.engine import ExecutorEngine
from pagedserve.scheduler.engine import SchedulerEngine
from pagedserve.scheduler.redis_pool import RedisBlockPool


@dataclass(slots=True)
class Samples:
    """Per step: (blocks in use with sharing, blocks unshared copies would need), all requests."""

    steps: list[tuple[int, int]] = field(default_factory=list)
    pool_used: list[int] = field(default_factory=list)  # the block manager's used blocks, per step

    def saving(self) -> float:
        shared = sum(w for w, _ in self.steps)
        unshared = sum(u for _, u in self.steps)
        return 1.0 - shared / unshared if unshared else 0.0


class BlockWatcher(InProcessExecutorClient):
    """Samples the scheduler's block tables before each step goes to the executor."""

    def __init__(self, engine: ExecutorEngine) -> None:
        super().__init__(engine)
        self.scheduler_engine: SchedulerEngine | None = None
        self.samples = Samples()

    async def execute_step(self, step: StepInput) -> StepOutput:
        shared = unshared = 0
        for request in self.scheduler_engine.scheduler.requests.values():
            tables = [s.block_table for s in request.seqs if s.block_table]
            shared += len({b for table in tables for b in table})
            unshared += sum(len(table) for table in tables)
        if unshared:
            self.samples.steps.append((shared, unshared))
            # the block manager's own count, to check the tables against (no request shares
            # with another here, so the two must agree)
            self.samples.pool_used.append(self.scheduler_engine.scheduler.blocks.counts().num_used)
        return await super().execute_step(step)


def prompt_only_saving(requests: list[BenchRequest], n: int, block_size: int) -> float:
    """The saving if n sequences shared only the prompt's full blocks (what parallel sampling
    does) and each wrote the trace's output length, counted the same way at every token: the
    yardstick that tells a beam search's shared history from its shared prompt."""
    shared = unshared = 0
    for r in requests:
        prompt = len(r.prompt_token_ids)
        full = prompt // block_size
        for t in range(1, r.output_len + 1):
            blocks = cdiv(prompt + t, block_size)
            shared += full + n * (blocks - full)
            unshared += n * blocks
    return 1.0 - shared / unshared


def traces(args: argparse.Namespace, vocab_size: int) -> dict[str, list[BenchRequest]]:
    """The two traces, seeded; ShareGPT-like outputs clipped to [out_min, out_max]."""
    alpaca = alpaca_like(
        args.requests, vocab_size=vocab_size, output_median=args.alpaca_output, seed=args.seed
    )
    share = sharegpt_like(
        args.requests, vocab_size=vocab_size, max_model_len=args.max_model_len,
        prompt_median=args.sharegpt_prompt, output_median=args.sharegpt_output, sigma=0.5, seed=args.seed,
    )  # fmt: skip
    clip = [replace(r, output_len=min(max(r.output_len, args.out_min), args.out_max)) for r in share]
    return {"alpaca": alpaca, "sharegpt": clip}


def params_for(mode: str, width: int, request: BenchRequest, seed: int) -> SamplingParams:
    if mode == "beam":
        return SamplingParams(max_tokens=request.output_len, temperature=0.0, n=width, use_beam_search=True)
    return SamplingParams(max_tokens=request.output_len, temperature=1.0, n=width, seed=seed, ignore_eos=True)


async def _outputs(stream) -> list[int]:
    """Tokens per choice of one request's stream, to its end."""
    lengths: dict[int, int] = {}
    while True:
        delta = await stream.get()
        for choice in delta.choices:
            lengths[choice.index] = lengths.get(choice.index, 0) + len(choice.token_ids)
        if delta.finished:
            return list(lengths.values())


async def _settle(engine: SchedulerEngine) -> None:
    """Let the loop run until the pool has heard every free (the last go with a step)."""
    engine.start()
    for _ in range(2000):
        if not engine.scheduler.has_work():
            break
        await asyncio.sleep(0.005)
    await engine.stop()


def fsck(engine: SchedulerEngine) -> list[str]:
    """The pool's and the scheduler's checks, their agreement, and no block left referenced."""
    pool = engine.pool
    problems = pool.check() + engine.scheduler.blocks.check()
    problems += engine.scheduler.compare_with_replica(pool.snapshot(), pool.load_requests())
    if pool.counts().num_used:
        problems.append(f"{pool.counts().num_used} blocks still referenced after the run")
    return problems


def run_mode(
    args: argparse.Namespace, redis_client, trace: str, requests: list[BenchRequest], mode: str, width: int
) -> dict:
    executor = ExecutorEngine.from_config(
        ExecutorConfig(
            model=args.model, device=args.device, block_size=args.block_size, num_kv_blocks=args.blocks,
            max_num_batched_tokens=4096, max_model_len=args.max_model_len,
        )
    )  # fmt: skip
    watcher = BlockWatcher(executor)
    pool = RedisBlockPool(redis_client, f"sharing-{trace}-{mode}-{width}-{time.time_ns()}")

    async def go() -> tuple[SchedulerEngine, list[list[int]], float]:
        engine = await SchedulerEngine.connect(watcher, pool, max_num_batched_tokens=4096)
        watcher.scheduler_engine = engine
        t0 = time.perf_counter()
        streams = [
            engine.submit(f"{trace}-{i}", r.prompt_token_ids, params_for(mode, width, r, args.seed + i))
            for i, r in enumerate(requests)
        ]
        engine.start()
        outs = await asyncio.gather(*(_outputs(s) for s in streams))
        wall = time.perf_counter() - t0
        await _settle(engine)
        return engine, outs, wall

    engine, outs, wall = asyncio.run(go())
    steps = watcher.samples.steps
    return {
        "trace": trace,
        "mode": mode,
        "width": width,
        "requests": len(requests),
        "mean_prompt": round(statistics.mean(len(r.prompt_token_ids) for r in requests), 1),
        "mean_output": round(statistics.mean(n for out in outs for n in out), 1),
        "saving": round(watcher.samples.saving(), 4),
        "prompt_only_saving": round(prompt_only_saving(requests, width, args.block_size), 4),
        "peak_with": max(w for w, _ in steps),
        "peak_without": max(u for _, u in steps),
        "steps": len(steps),
        "wall_s": round(wall, 1),
        "preemptions": engine.scheduler.stats.num_preemptions,
        "fsck": fsck(engine),
        "samples": steps,
        "pool_used": watcher.samples.pool_used,
    }


def run(args: argparse.Namespace, redis_client) -> list[dict]:
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    rows = []
    for trace, requests in traces(args, vocab).items():
        for mode, widths in (("beam", args.widths), ("parallel", args.ns)):
            for width in widths:
                rows.append(run_mode(args, redis_client, trace, requests, mode, width))
                print(f"  {trace} {mode} {width}: saving {rows[-1]['saving']:.1%}", flush=True)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pagedserve.common.models import default_model

    parser.add_argument("--model", default=default_model())
    parser.add_argument("--device", default=None, help="cpu or cuda; default: cuda when there is one")
    parser.add_argument("--requests", type=int, default=8, help="requests per trace")
    parser.add_argument("--widths", type=int, nargs="*", default=[2, 4, 6], help="beam widths")
    parser.add_argument("--ns", type=int, nargs="*", default=[2, 4, 6], help="parallel samples")
    parser.add_argument("--alpaca-output", type=float, default=60, help="Alpaca-like output median")
    parser.add_argument("--sharegpt-prompt", type=float, default=160, help="ShareGPT-like prompt median")
    parser.add_argument("--sharegpt-output", type=float, default=160, help="ShareGPT-like output median")
    parser.add_argument("--out-min", type=int, default=120, help="ShareGPT-like outputs clipped to at least")
    parser.add_argument("--out-max", type=int, default=200, help="ShareGPT-like outputs clipped to at most")
    parser.add_argument(
        "--blocks", type=int, default=4096, help="KV blocks (enough that nothing is preempted)"
    )
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/bench_sharing.json")
    parser.add_argument("--docs", default=None, help="also write the result as a section of this file")


def main(argv: list[str] | None = None) -> int:
    import redis

    from pagedserve.common.redis_harness import RedisServer

    parser = argparse.ArgumentParser(prog="python -m pagedserve.bench.sharing_bench", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.device is None:  # named in the results
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        rows = run(args, client)
        client.close()
    print_table(rows)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "docs")}
    if Path(args.model).resolve().is_relative_to(Path.cwd()):  # no machine's absolute path
        config["model"] = str(Path(args.model).resolve().relative_to(Path.cwd()))
    result = {
        "config": config,
        "paper": PAPER_JSON,
        "rows": [{k: v for k, v in r.items() if k not in ("samples", "pool_used")} for r in rows],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.docs:
        write_section(Path(args.docs), section(result))
    clean = all(not r["fsck"] and r["preemptions"] == 0 for r in rows)
    return 0 if clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
