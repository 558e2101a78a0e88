"""The load generator: sends a workload to a running stack through the public gRPC SDK
(`AsyncClient.stream`) and records when each stream message arrives, while polling the
scheduler's Stats for KV figures.

Arrival modes: all at once (rate None), Poisson at `rate` requests/s, and/or at most
`max_concurrency` requests in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import NamedTuple

import grpc

from pagedserve.bench.metrics import KVSample, RequestRecord
from pagedserve.bench.workload import BenchRequest, arrival_times
from pagedserve.client import AsyncClient
from pagedserve.v1 import scheduler_pb2, scheduler_pb2_grpc


class StatsSnapshot(NamedTuple):
    preemptions: int
    prefix_hit_tokens: int
    prefix_query_tokens: int
    blocks_total: int
    block_size: int
    max_model_len: int


class LoadResult(NamedTuple):
    records: list[RequestRecord]
    samples: list[KVSample]
    before: StatsSnapshot | None
    after: StatsSnapshot | None

    @property
    def preemptions(self) -> int:
        return self.after.preemptions - self.before.preemptions if self.before and self.after else 0

    @property
    def prefix_hit_rate(self) -> float:
        if not (self.before and self.after):
            return float("nan")
        query = self.after.prefix_query_tokens - self.before.prefix_query_tokens
        hits = self.after.prefix_hit_tokens - self.before.prefix_hit_tokens
        return hits / query if query else float("nan")


class StatsPoller:
    """Polls the scheduler's Stats RPC every `interval` seconds into `samples`."""

    def __init__(self, scheduler_address: str, interval: float = 0.05) -> None:
        self.channel = grpc.aio.insecure_channel(scheduler_address)
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)
        self.interval = interval
        self.samples: list[KVSample] = []

    async def stats(self) -> scheduler_pb2.StatsResponse:
        return await self.stub.Stats(scheduler_pb2.StatsRequest(), timeout=5.0)

    async def snapshot(self) -> StatsSnapshot:
        s = await self.stats()
        return StatsSnapshot(
            s.preemptions_total, s.prefix_cache_hit_tokens, s.prefix_cache_query_tokens,
            s.blocks_total, s.block_size, s.max_model_len,
        )  # fmt: skip

    async def run(self, t0: float) -> None:
        while True:
            try:
                s = await self.stats()
            except Exception:  # a missed sample is not worth failing the run for
                await asyncio.sleep(self.interval)
                continue
            sample = KVSample(
                time.perf_counter() - t0, s.blocks_used, s.blocks_total,
                s.requests_running, s.requests_waiting, s.kv_utilization,
            )  # fmt: skip
            self.samples.append(sample)
            await asyncio.sleep(self.interval)

    async def close(self) -> None:
        await self.channel.close()


def parse_metrics(text: str) -> dict[str, float]:
    """Unlabelled samples of Prometheus text exposition: name -> value."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value.split()[0])
    return out


class MetricsPoller(StatsPoller):
    """The same figures from the gateway's HTTP /metrics (the scheduler's Stats, mirrored on
    each scrape), for a stack whose scheduler is not reachable."""

    def __init__(self, metrics_url: str, interval: float = 0.05) -> None:
        import httpx

        self.http = httpx.AsyncClient(timeout=5.0)
        self.url = metrics_url
        self.interval = interval
        self.samples = []

    async def stats(self) -> scheduler_pb2.StatsResponse:
        reply = await self.http.get(self.url)
        reply.raise_for_status()
        m = parse_metrics(reply.text)
        return scheduler_pb2.StatsResponse(
            blocks_total=int(m.get("pagedserve_kv_blocks_total", 0)),
            blocks_used=int(m.get("pagedserve_kv_blocks_used", 0)),
            requests_running=int(m.get("pagedserve_requests_running", 0)),
            requests_waiting=int(m.get("pagedserve_requests_waiting", 0)),
            kv_utilization=m.get("pagedserve_kv_utilization", 0.0),
            preemptions_total=int(m.get("pagedserve_preemptions_total", 0)),
            prefix_cache_hit_tokens=int(m.get("pagedserve_prefix_cache_hit_tokens_total", 0)),
            prefix_cache_query_tokens=int(m.get("pagedserve_prefix_cache_query_tokens_total", 0)),
        )

    async def close(self) -> None:
        await self.http.aclose()


async def _one(
    client: AsyncClient, index: int, request: BenchRequest, record: RequestRecord, seed: int
) -> None:
    record.sent = time.perf_counter()
    try:
        async for delta in client.stream(
            token_ids=request.prompt_token_ids,
            max_tokens=request.output_len,
            ignore_eos=True,
            temperature=0.0 if request.n == 1 else 1.0,
            n=request.n,
            seed=seed + index,
        ):
            count = sum(len(c.token_ids) for c in delta.choices)
            if count:
                record.token_times.append(time.perf_counter())
                record.token_counts.append(count)
    except Exception as exc:  # a failed request is reported, not fatal to the run
        record.error = f"{type(exc).__name__}: {exc}"
    record.finished = time.perf_counter()


async def run_load(
    gateway_address: str,
    requests: Sequence[BenchRequest],
    *,
    rate: float | None = None,
    max_concurrency: int | None = None,
    scheduler_address: str | None = None,
    metrics_url: str | None = None,
    seed: int = 0,
    progress: bool = True,
    label: str = "requests",
) -> LoadResult:
    """Send every request (Poisson at `rate`, or all at once) and wait for all to finish.
    KV figures come from the scheduler's Stats RPC, else from the gateway's /metrics, else none."""
    from tqdm import tqdm

    offsets = arrival_times(len(requests), rate, seed)
    records = [
        RequestRecord(f"bench-{i}", 0.0, len(r.prompt_token_ids), r.output_len * r.n)
        for i, r in enumerate(requests)
    ]
    poller: StatsPoller | None = None
    if scheduler_address:
        poller = StatsPoller(scheduler_address)
    elif metrics_url:
        poller = MetricsPoller(metrics_url)
    before = await poller.snapshot() if poller else None
    limit = asyncio.Semaphore(max_concurrency or len(requests) or 1)
    bar = tqdm(total=len(requests), desc=label, disable=not progress, leave=False)
    t0 = time.perf_counter()

    async def paced(i: int) -> None:
        delay = t0 + offsets[i] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        async with limit:
            await _one(client, i, requests[i], records[i], seed)
        bar.update(1)

    async with AsyncClient(gateway_address, timeout=600.0) as client:
        poll_task = asyncio.create_task(poller.run(t0)) if poller else None
        try:
            await asyncio.gather(*(paced(i) for i in range(len(requests))))
        finally:
            bar.close()
            if poll_task is not None:
                poll_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poll_task
    after = await poller.snapshot() if poller else None
    samples = poller.samples if poller else []
    if poller:
        await poller.close()
    for r in records:  # times relative to the run's start, for plots and the JSON
        r.sent -= t0
        r.finished -= t0
        r.token_times = [t - t0 for t in r.token_times]
    return LoadResult(records, samples, before, after)
