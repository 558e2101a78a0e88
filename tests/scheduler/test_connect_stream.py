"""The shared Connect stream: many requests on one call, one message per step, errors and
aborts per request, and the gateway's client for it — a real scheduler service on a real
Redis, driving the fake executor."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis

from pagedserve.common.errors import InvalidArgument, Unavailable
from pagedserve.common.params import SamplingParams
from pagedserve.gateway.downstream import SchedulerClient
from pagedserve.scheduler.fsck import fsck
from pagedserve.v1 import common_pb2, scheduler_pb2

from .fake_executor import FakeExecutor, reference
from .test_scheduler_grpc import VOCAB, greedy, started, until_idle


def submit(request_id: str, prompt: list[int], max_tokens: int) -> scheduler_pb2.ConnectRequest:
    return scheduler_pb2.ConnectRequest(
        submit=scheduler_pb2.SubmitRequest(
            request_id=request_id, prompt_token_ids=prompt, sampling=greedy(max_tokens)
        )
    )


def connect(stub):
    """A Connect call and the queue its requests are taken from (None ends the sending side)."""
    outbox: asyncio.Queue = asyncio.Queue()

    async def requests():
        while (msg := await outbox.get()) is not None:
            yield msg

    return stub.Connect(requests()), outbox


def test_one_stream_carries_every_request_one_message_per_step(redis_url):
    fake = FakeExecutor(num_blocks=128, block_size=4, vocab_size=VOCAB, max_model_len=128)
    fake.step_delay = 0.005
    prompts = {f"r{i}": [5 + i, 6, 7 + i] for i in range(8)}

    async def go():
        running, channel, stub = await started(redis_url, fake)
        try:
            call, outbox = connect(stub)
            for rid, prompt in prompts.items():
                outbox.put_nowait(submit(rid, prompt, 12))
            outbox.put_nowait(submit("too-long", [5] * 120, 20))
            tokens: dict[str, list[int]] = {rid: [] for rid in prompts}
            finished: dict[str, int] = {}
            errors = []
            messages = 0
            while len(finished) < len(prompts):
                msg = await call.read()
                assert msg is not grpc.aio.EOF
                messages += 1
                errors.extend(msg.errors)
                for update in msg.updates:
                    for choice in update.choices:
                        tokens[update.request_id].extend(choice.token_ids)
                        if choice.finish_reason:
                            finished[update.request_id] = choice.finish_reason
            outbox.put_nowait(None)  # done sending: the call ends once nothing is left
            assert await call.read() is grpc.aio.EOF
            return tokens, finished, errors, messages, await until_idle(stub)
        finally:
            await channel.close()
            await running.stop()

    tokens, finished, errors, messages, stats = asyncio.run(go())
    for rid, prompt in prompts.items():
        assert tokens[rid] == reference(prompt, 12, VOCAB), rid
        assert finished[rid] == common_pb2.FINISH_REASON_LENGTH
    # the refused request says why, on the same stream, and nothing else stopped
    assert [(e.request_id, e.code) for e in errors] == [("too-long", "INVALID_ARGUMENT")]
    assert "max_model_len=128" in errors[0].message
    # 8 requests x 12 tokens would be 96 messages on per-request streams; here about one a step
    assert messages <= 40, messages
    assert stats.blocks_used == 0
    assert fsck(redis.Redis.from_url(redis_url), "grpc-test") == []


def test_abort_on_the_stream_and_a_broken_stream_free_their_blocks(redis_url):
    fake = FakeExecutor(num_blocks=64, block_size=4, vocab_size=VOCAB, max_model_len=128)
    fake.step_delay = 0.01

    async def go():
        running, channel, stub = await started(redis_url, fake)
        try:
            call, outbox = connect(stub)
            outbox.put_nowait(submit("a", [5, 6, 7], 100))
            outbox.put_nowait(submit("b", [8, 9, 10], 100))
            await call.read()
            outbox.put_nowait(scheduler_pb2.ConnectRequest(abort=scheduler_pb2.AbortRequest(request_id="a")))
            reasons = {}
            while "a" not in reasons:
                msg = await call.read()
                for update in msg.updates:
                    for choice in update.choices:
                        if choice.finish_reason:
                            reasons[update.request_id] = choice.finish_reason
            assert reasons == {"a": common_pb2.FINISH_REASON_ABORT}
            stats = await stub.Stats(scheduler_pb2.StatsRequest())
            assert stats.requests_running == 1 and stats.blocks_used > 0  # b runs on
            call.cancel()  # the gateway goes away: b is aborted, its blocks freed
            return await until_idle(stub)
        finally:
            await channel.close()
            await running.stop()

    stats = asyncio.run(go())
    assert stats.blocks_used == 0
    assert fsck(redis.Redis.from_url(redis_url), "grpc-test") == []


def test_gateway_client_shares_one_call_and_fails_every_request_when_it_breaks(redis_url):
    fake = FakeExecutor(num_blocks=128, block_size=4, vocab_size=VOCAB, max_model_len=128)
    fake.step_delay = 0.005

    async def go():
        running, channel, stub = await started(redis_url, fake)
        client = SchedulerClient(f"127.0.0.1:{running.port}", timeout=2.0)
        sampling = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)

        async def run(rid: str, prompt: list[int]) -> list[int]:
            out = []
            async for update in client.submit(rid, prompt, sampling, 0):
                for choice in update.choices:
                    out.extend(choice.token_ids)
            return out

        try:
            prompts = {f"g{i}": [11 + i, 12, 13] for i in range(6)}
            results = await asyncio.gather(*(run(rid, p) for rid, p in prompts.items()))
            for (rid, prompt), got in zip(prompts.items(), results, strict=True):
                assert got == reference(prompt, 10, VOCAB), rid
            assert client.shared is not None and client.shared[0]._connection is not None
            first_call = client.shared[0]._connection
            # a refused request fails alone, with the scheduler's status and message
            with pytest.raises(InvalidArgument, match="max_model_len"):
                await run("long", [5] * 200)
            assert client.shared[0]._connection is first_call and not first_call.broken
            # a request whose client stops reading is aborted by cancel(): blocks freed
            stream = client.submit("cancelled", [5, 6], SamplingParams(max_tokens=100, ignore_eos=True), 0)
            updates = aiter(stream)
            await anext(updates)
            stream.cancel()
            stats = await until_idle(stub)
            assert stats.blocks_used == 0 and stats.requests_running == 0
            # the scheduler goes away mid-request: the request learns it (Unavailable)
            fake.step_delay = 0.05  # longer than the server's grace period on stop
            long_sampling = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
            pending = client.submit("cut", [5, 6, 7], long_sampling, 0)
            it = aiter(pending)
            first = await anext(it)
            assert first.choices
            await running.stop()
            with pytest.raises(Unavailable) as err:
                async for _ in it:
                    pass
            assert "scheduler at 127.0.0.1" in err.value.message
            assert first_call.broken
        finally:
            await client.close()
            await channel.close()

    asyncio.run(go())
    assert fsck(redis.Redis.from_url(redis_url), "grpc-test") == []
