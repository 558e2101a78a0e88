"""Scheduler benchmark: KV utilization on a synthetic trace, and control-plane time per step.

    python -m pagedserve.bench.scheduler_bench [--redis-url URL] [--quick]

The executor is a no-op client (it samples a fixed token whenever the protocol says a token is
due), so every figure is the scheduler's own: planning, the one Redis round trip of the step
(a Lua script), and taking the step's tokens. Without --redis-url a throwaway local Redis is
started. Prints markdown tables.

- KV utilization: live tokens / allocated slots of the running sequences after each step,
  averaged over the steps of a lognormal trace; beside it, the same live tokens over what a
  contiguous allocator reserves (max_model_len slots per running sequence).
- Control-plane time: steady decode steps at a fixed batch size; the scheduler's time on the
  step's critical path (schedule() + handing the log to the write-behind + update(); the
  Redis call itself runs beside the executor call), p50 and p90, and Redis round trips per step.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
import uuid
from collections.abc import Sequence

from pagedserve.common.params import SamplingParams
from pagedserve.common.step import ExecutorInfo, SampledToken, StepInput, StepOutput
from pagedserve.scheduler.block_pool import BlockPool
from pagedserve.scheduler.engine import SchedulerEngine

SAMPLED_TOKEN = 7
EXECUTOR_MS = 10.0  # a model forward's time in the planned-ahead measurement


class NoOpExecutorClient:
    """An `ExecutorClient` that runs no model: it tracks how many tokens each sequence knows
    and has computed, and samples `SAMPLED_TOKEN` exactly when the step protocol says a token
    is due (scheduled tokens reach the end of the known tokens)."""

    def __init__(self, num_blocks: int, block_size: int, max_model_len: int = 8192, vocab_size: int = 32000,
                 step_seconds: float = 0.0):  # fmt: skip
        self.step_seconds = step_seconds  # a model forward's time, slept (the loop runs meanwhile)
        self.step_starts: list[float] = []  # perf_counter when each step started running
        self.step_ends: list[float] = []  # ... and when its output was ready
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.epoch = uuid.uuid4().hex
        self.known: dict[str, list[int]] = {}  # request id -> [tokens known, tokens computed]
        self._one_at_a_time: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None  # per loop

    async def info(self) -> ExecutorInfo:
        return ExecutorInfo(
            "noop", "NoOp", "float32", self.vocab_size, self.max_model_len, self.num_blocks,
            self.block_size, self.epoch, (2,), "none", "cpu",
        )  # fmt: skip

    async def execute_step(self, step: StepInput) -> StepOutput:
        # One step at a time, in the order they came, as an executor runs them: the loop sends
        # step k + 1 while step k runs, and k + 1 starts when k ends.
        loop = asyncio.get_running_loop()
        if self._one_at_a_time is None or self._one_at_a_time[0] is not loop:
            self._one_at_a_time = (loop, asyncio.Lock())
        async with self._one_at_a_time[1]:
            return await self._execute_step(step)

    async def _execute_step(self, step: StepInput) -> StepOutput:
        self.step_starts.append(time.perf_counter())
        if self.step_seconds:
            await asyncio.sleep(self.step_seconds)
        known = self.known
        for rid in step.forget_request_ids:
            known.pop(rid, None)
        sampled = []
        for r in step.new_requests:
            state = known[r.request_id] = [
                len(r.prompt_token_ids) + len(r.output_token_ids),
                r.num_computed_tokens + r.num_scheduled_tokens,
            ]
            if state[1] == state[0]:
                state[0] += 1
                sampled.append(SampledToken(r.request_id, SAMPLED_TOKEN))
        for r in step.cached_requests:
            state = known[r.request_id]
            state[1] += r.num_scheduled_tokens
            if state[1] == state[0]:
                state[0] += 1
                sampled.append(SampledToken(r.request_id, SAMPLED_TOKEN))
        # The output is ready now: this stand-in's own bookkeeping above (a Python loop over the
        # batch) is the executor's time, not the control plane's.
        self.step_ends.append(time.perf_counter())
        return StepOutput(self.epoch, sampled)

    async def close(self) -> None:
        return None


def lognormal_trace(
    num_requests: int, max_model_len: int, seed: int = 0, prompt_mu: float = 5.5, output_mu: float = 5.0
) -> list[tuple[int, int]]:
    """(prompt_len, output_len) pairs: lognormal (sigma 0.8; medians e^mu), clipped to max_model_len."""
    rng = random.Random(seed)
    trace = []
    for _ in range(num_requests):
        prompt = max(1, min(int(rng.lognormvariate(prompt_mu, 0.8)), max_model_len // 2))
        output = max(1, min(int(rng.lognormvariate(output_mu, 0.8)), max_model_len - prompt))
        trace.append((prompt, output))
    return trace


async def _engine(pool: BlockPool, num_blocks: int, block_size: int, **limits) -> SchedulerEngine:
    executor = NoOpExecutorClient(num_blocks, block_size, max_model_len=limits.get("max_model_len") or 8192)
    return await SchedulerEngine.connect(executor, pool, **limits)


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 30000) for _ in range(n)]


async def kv_utilization(pool: BlockPool, trace: Sequence[tuple[int, int]], *, num_blocks: int,
                         block_size: int, max_model_len: int) -> dict[str, float]:  # fmt: skip
    """Run the trace to the end; average the per-step figures over the steps."""
    engine = await _engine(pool, num_blocks, block_size, max_model_len=max_model_len)
    sched = engine.scheduler
    rng = random.Random(1)
    for i, (prompt, output) in enumerate(trace):
        engine.submit(f"t{i}", _prompt(rng, prompt), SamplingParams(max_tokens=output, ignore_eos=True))
    paged, contiguous = [], []
    while sched.has_work():
        if not await engine.step():
            continue
        running = sched.running
        if not running:
            continue
        live = sum(s.num_computed_tokens for s in running)
        paged.append(sched.stats.kv_utilization)
        contiguous.append(live / (len(running) * max_model_len))
    return {
        "steps": len(paged),
        "paged": statistics.fmean(paged),
        "contiguous": statistics.fmean(contiguous),
        "preemptions": sched.stats.num_preemptions,
    }


async def control_plane(pool: BlockPool, batch: int, *, steps: int, block_size: int, num_blocks: int,
                        count_round_trips, script_usec=lambda: 0) -> dict[str, float]:  # fmt: skip
    """Steady decode at `batch` sequences: the scheduler's time on the step's critical path
    (the replica write is not on it), this process's CPU time per step (the write-behind's
    encoding and the no-op executor's share included), and the Redis server's time in the
    step script."""
    engine = await _engine(pool, num_blocks, block_size, max_num_seqs=max(batch, 1), max_model_len=8192)
    sched = engine.scheduler
    rng = random.Random(2)
    for i in range(batch):
        engine.submit(f"b{i}", _prompt(rng, 32 + i % 16), SamplingParams(max_tokens=4096, ignore_eos=True))
    while len(sched.running) < batch or any(s.num_computed_tokens < s.num_tokens - 1 for s in sched.running):
        await engine.step()
    for _ in range(8):  # warm-up
        await engine.step()
    times, trips, cpu = [], [], []
    script_before = script_usec()
    for _ in range(steps):
        before = count_round_trips()
        t0 = time.process_time()
        await engine.step()
        await engine.replicator.flush()  # the step's write-behind call (overlaps the executor in a server)
        cpu.append(time.process_time() - t0)
        trips.append(count_round_trips() - before)
        times.append(engine.control_seconds)
    times.sort()
    return {
        "p50_ms": 1e3 * times[len(times) // 2],
        "p90_ms": 1e3 * times[int(len(times) * 0.9)],
        "round_trips": statistics.fmean(trips),
        "cpu_ms": 1e3 * statistics.fmean(cpu),
        "script_ms": 1e-3 * (script_usec() - script_before) / steps,
    }


async def exposed_control(pool: BlockPool, batch: int, *, steps: int, block_size: int, num_blocks: int,
                          executor_ms: float) -> dict[str, float]:  # fmt: skip
    """Steady decode at `batch` with the step loop's planning ahead (`step_ahead`) and an
    executor that takes `executor_ms` per step: the time between two steps beyond the executor's own — the control plane left on the critical path."""
    executor = NoOpExecutorClient(num_blocks, block_size, step_seconds=executor_ms / 1e3)
    engine = await SchedulerEngine.connect(executor, pool, max_num_seqs=max(batch, 1), max_model_len=8192)
    sched = engine.scheduler
    rng = random.Random(2)
    for i in range(batch):
        engine.submit(f"b{i}", _prompt(rng, 32 + i % 16), SamplingParams(max_tokens=4096, ignore_eos=True))
    while len(sched.running) < batch or any(s.num_computed_tokens < s.num_tokens - 1 for s in sched.running):
        await engine.step_ahead()
    for _ in range(8):
        await engine.step_ahead()
    executor.step_starts.clear()
    executor.step_ends.clear()
    for _ in range(steps):
        await engine.step_ahead()
    # From one step's output being ready to the next step starting at the executor. A step was in
    # flight when the lists were cleared: the i-th end recorded is the step before the i-th start.
    n = min(len(executor.step_ends), len(executor.step_starts))
    ends, starts = executor.step_ends[:n], executor.step_starts[:n]
    gaps = sorted(start - end for end, start in zip(ends, starts, strict=True))
    await engine.stop()
    return {
        "p50_ms": 1e3 * max(gaps[len(gaps) // 2], 0.0),
        "p90_ms": 1e3 * max(gaps[int(len(gaps) * 0.9)], 0.0),
    }


class CountingRedis:
    """Counts commands sent by one redis-py client (a pipeline counts once)."""

    def __init__(self, client) -> None:
        self.count = 0
        original = client.execute_command

        def counted(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        client.execute_command = counted


def main(argv: list[str] | None = None) -> int:
    import redis

    from pagedserve.common.redis_harness import RedisServer
    from pagedserve.scheduler.redis_pool import RedisBlockPool

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis-url", default=None, help="default: start a throwaway local redis-server")
    parser.add_argument("--quick", action="store_true", help="fewer requests and steps")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-model-len", type=int, default=4096)
    args = parser.parse_args(argv)

    server = None
    url = args.redis_url
    if url is None:
        server = RedisServer(prefer_docker=False).start()
        url = server.url
    try:
        client = redis.Redis.from_url(url)
        counter = CountingRedis(client)
        bs = args.block_size
        num_requests = 200 if args.quick else 1000
        trace = lognormal_trace(num_requests, args.max_model_len)
        num_blocks = 4096
        util = asyncio.run(
            kv_utilization(RedisBlockPool(client, f"bench-util-{uuid.uuid4().hex[:8]}"), trace,
                           num_blocks=num_blocks, block_size=bs, max_model_len=args.max_model_len)
        )  # fmt: skip
        mean_p = statistics.fmean(p for p, _ in trace)
        mean_o = statistics.fmean(o for _, o in trace)
        print(f"## KV utilization ({num_requests} requests, lognormal: mean prompt {mean_p:.0f}, "
              f"mean output {mean_o:.0f} tokens; {num_blocks} blocks x {bs}; max_model_len {args.max_model_len})\n")  # fmt: skip
        print("| allocator | live tokens / allocated slots (mean over steps) |")
        print("|---|---|")
        print(f"| paged (block_size {bs}) | {100 * util['paged']:.1f}% |")
        print(f"| contiguous max_model_len reservation | {100 * util['contiguous']:.1f}% |")
        print(f"\n{util['steps']} steps, {util['preemptions']} preemptions\n")

        steps = 50 if args.quick else 200
        print(
            "## Scheduler time per step, nothing overlapped "
            f"(schedule + update; the Redis write runs beside the executor; {steps} steps)\n"
        )
        print(
            "| batch | p50 ms | p90 ms | Python CPU ms / step | Redis script ms / step | round trips / step |"
        )
        print("|---|---|---|---|---|---|")

        def script_usec() -> int:
            return int(client.info("commandstats").get("cmdstat_evalsha", {}).get("usec", 0))

        for batch in (1, 16, 64, 256):
            res = asyncio.run(
                control_plane(RedisBlockPool(client, f"bench-cp-{uuid.uuid4().hex[:8]}"), batch, steps=steps,
                              block_size=bs, num_blocks=16384, count_round_trips=lambda: counter.count,
                              script_usec=script_usec)
            )  # fmt: skip
            print(f"| {batch} | {res['p50_ms']:.3f} | {res['p90_ms']:.3f} | {res['cpu_ms']:.3f} | "
                  f"{res['script_ms']:.3f} | {res['round_trips']:.2f} |")  # fmt: skip
            sys.stdout.flush()
        print(
            "\n## Control plane left on the critical path when the next step is planned while the "
            f"executor runs (the server's loop; a {EXECUTOR_MS:g} ms executor; {steps} steps)\n"
        )
        print("| batch | p50 ms | p90 ms |")
        print("|---|---|---|")
        for batch in (1, 16, 64, 256):
            res = asyncio.run(
                exposed_control(RedisBlockPool(client, f"bench-ex-{uuid.uuid4().hex[:8]}"), batch, steps=steps,
                                block_size=bs, num_blocks=16384, executor_ms=EXECUTOR_MS)
            )  # fmt: skip
            print(f"| {batch} | {res['p50_ms']:.3f} | {res['p90_ms']:.3f} |")
            sys.stdout.flush()
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
