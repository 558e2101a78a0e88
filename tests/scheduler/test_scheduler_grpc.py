"""The Scheduler gRPC service in-process, on a real Redis, driving a fake executor."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis

from pagedserve.common.grpc_utils import health_check
from pagedserve.scheduler import server as scheduler_server
from pagedserve.scheduler.config import SchedulerConfig
from pagedserve.scheduler.fsck import fsck
from pagedserve.scheduler.redis_pool import RedisBlockPool
from pagedserve.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

from .fake_executor import FakeExecutor, reference

VOCAB = 1000


def greedy(max_tokens: int, **kw) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


async def started(redis_url: str, fake: FakeExecutor, **config):
    cfg = SchedulerConfig(redis_url=redis_url, host="127.0.0.1", port=0, pool_id="grpc-test", **config)
    pool = RedisBlockPool(redis.Redis.from_url(redis_url), cfg.pool_id)
    running = await scheduler_server.start(cfg, fake, pool)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    return running, channel, scheduler_pb2_grpc.SchedulerStub(channel)


async def until_idle(stub) -> scheduler_pb2.StatsResponse:
    for _ in range(500):
        stats = await stub.Stats(scheduler_pb2.StatsRequest())
        if stats.requests_running == 0 and stats.requests_waiting == 0 and stats.blocks_used == 0:
            return stats
        await asyncio.sleep(0.01)
    raise AssertionError(f"scheduler never went idle: {stats}")


def test_submit_streams_tokens_and_stats_add_up(redis_url):
    fake = FakeExecutor(num_blocks=64, block_size=4, vocab_size=VOCAB, max_model_len=128)

    async def go():
        running, channel, stub = await started(redis_url, fake)
        try:
            prompt = [5, 6, 7, 8, 9, 10]
            msgs = [
                m
                async for m in stub.Submit(
                    scheduler_pb2.SubmitRequest(request_id="a", prompt_token_ids=prompt, sampling=greedy(7))
                )
            ]
            tokens = [t for m in msgs for c in m.choices for t in c.token_ids]
            assert tokens == reference(prompt, 7, VOCAB)
            assert msgs[-1].usage.completion_tokens == 7 and msgs[-1].usage.prompt_tokens == 6
            assert msgs[-1].choices[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
            assert all(m.usage.completion_tokens == 0 for m in msgs[:-1])
            stats = await until_idle(stub)
            assert stats.generated_tokens_total == 7 and stats.steps_total >= 7
            assert stats.blocks_total == 64 and stats.block_size == 4 and stats.max_model_len == 128
            assert list(stats.eos_token_ids) == [2] and stats.vocab_size == VOCAB and stats.model == "fake"
            assert stats.blocks_free + stats.blocks_cached == 64
            assert await asyncio.to_thread(
                health_check, f"127.0.0.1:{running.port}", "pagedserve.v1.Scheduler"
            )
        finally:
            await channel.close()
            await running.stop()

    asyncio.run(go())
    assert fsck(redis.Redis.from_url(redis_url), "grpc-test") == []


def test_errors_map_to_status_codes(redis_url):
    fake = FakeExecutor(num_blocks=16, block_size=4, vocab_size=VOCAB, max_model_len=64)
    fake.step_delay = 0.01

    async def go():
        running, channel, stub = await started(redis_url, fake, max_queued_requests=1, max_num_seqs=1)
        try:
            too_long = scheduler_pb2.SubmitRequest(
                request_id="x", prompt_token_ids=[5] * 60, sampling=greedy(10)
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Submit(too_long):
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "max_model_len=64" in err.value.details()
            bad = scheduler_pb2.SubmitRequest(
                request_id="y",
                prompt_token_ids=[5],
                sampling=common_pb2.SamplingParams(max_tokens=2, top_p=2.0),
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Submit(bad):
                    pass
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in err.value.details()
            # one request runs, one waits (max_num_seqs=1), the third finds the queue full
            calls = [
                stub.Submit(
                    scheduler_pb2.SubmitRequest(
                        request_id=f"r{i}", prompt_token_ids=[5, 6], sampling=greedy(40)
                    )
                )
                for i in range(2)
            ]
            await calls[0].read()
            await asyncio.sleep(0.05)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Submit(
                    scheduler_pb2.SubmitRequest(request_id="r2", prompt_token_ids=[5, 6], sampling=greedy(4))
                ):
                    pass
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            stats = await stub.Stats(scheduler_pb2.StatsRequest())
            assert stats.blocks_used > 0 and stats.requests_running == 1 and stats.requests_waiting == 1
            assert (await stub.Abort(scheduler_pb2.AbortRequest(request_id="r1"))).found
            assert not (await stub.Abort(scheduler_pb2.AbortRequest(request_id="nope"))).found
            rest = [m async for m in calls[1]]
            assert rest[-1].choices[0].finish_reason == common_pb2.FINISH_REASON_ABORT
            # the client of r0 goes away: the request is aborted and its blocks freed
            calls[0].cancel()
            await until_idle(stub)
        finally:
            await channel.close()
            await running.stop()

    asyncio.run(go())
    assert fsck(redis.Redis.from_url(redis_url), "grpc-test") == []


def test_a_slow_client_does_not_stall_the_loop(redis_url):
    fake = FakeExecutor(num_blocks=64, block_size=4, vocab_size=VOCAB, max_model_len=128)

    async def go():
        running, channel, stub = await started(redis_url, fake)
        try:
            slow = stub.Submit(
                scheduler_pb2.SubmitRequest(request_id="slow", prompt_token_ids=[5, 6], sampling=greedy(30))
            )
            first = await slow.read()  # then it stops reading for a while
            fast = [m async for m in stub.Submit(
                scheduler_pb2.SubmitRequest(request_id="fast", prompt_token_ids=[7, 8], sampling=greedy(30))
            )]  # fmt: skip
            assert sum(len(c.token_ids) for m in fast for c in m.choices) == 30
            rest = []
            while (msg := await slow.read()) is not grpc.aio.EOF:
                rest.append(msg)
            tokens = [t for m in [first, *rest] for c in m.choices for t in c.token_ids]
            assert tokens == reference([5, 6], 30, VOCAB)  # nothing the slow client missed
        finally:
            await channel.close()
            await running.stop()

    asyncio.run(go())
