"""The Executor gRPC service end to end, in process: Info, ExecuteStep, errors mapped to the
core's exceptions, health answering while a step runs; and the `pagedserve executor` command."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from executor_harness import GREEDY, VOCAB, make_prompts
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagedserve.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from pagedserve.common.grpc_utils import health_check
from pagedserve.common.redis_harness import free_port
from pagedserve.common.step import CachedRequestData, NewRequestData, StepInput
from pagedserve.executor import server
from pagedserve.executor.client import GrpcExecutorClient, InProcessExecutorClient
from pagedserve.executor.servicer import SERVICE_NAME


async def generate(client, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Prefill every prompt in one step, then decode `steps - 1` tokens each (blocks of 8, 4 per request)."""
    info = await client.info()
    new = [
        NewRequestData(f"r{i}", p, [], GREEDY, [4 * i + j for j in range(4)], 0, len(p))
        for i, p in enumerate(prompts)
    ]
    out = await client.execute_step(StepInput(0, info.epoch, new_requests=new))
    tokens = {s.request_id: [s.token_id] for s in out.sampled}
    for step_id in range(1, steps):
        cached = [CachedRequestData(f"r{i}", [], 1, len(p) + step_id - 1) for i, p in enumerate(prompts)]
        out = await client.execute_step(StepInput(step_id, info.epoch, cached_requests=cached))
        assert out.epoch == info.epoch and out.execute_seconds > 0
        for s in out.sampled:
            tokens[s.request_id].append(s.token_id)
    return [tokens[f"r{i}"] for i in range(len(prompts))]


def _step_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("executor-step")]


def test_grpc_matches_in_process(tiny_model_dir, make_engine) -> None:
    path = tiny_model_dir("llama")
    prompts = make_prompts((3, 11, 20), VOCAB, seed=9)

    async def scenario() -> None:
        engine = make_engine(path)
        expected = await generate(InProcessExecutorClient(make_engine(path)), prompts, 6)
        srv = await server.start_server(engine, "127.0.0.1", 0)
        client = GrpcExecutorClient(f"127.0.0.1:{srv.bound_port}")
        try:
            assert await client.info() == engine.info()
            assert await generate(client, prompts, 6) == expected
            epoch = engine.epoch
            # A malformed step: INVALID_ARGUMENT comes back as InvalidArgument, state untouched.
            bad = StepInput(9, epoch, cached_requests=[CachedRequestData("nope", [], 1, 0)])
            with pytest.raises(InvalidArgument, match="'nope' is not known"):
                await client.execute_step(bad)
            with pytest.raises(FailedPrecondition, match="is not this executor's epoch"):
                await client.execute_step(StepInput(10, "stale"))
            assert sorted(engine.requests) == ["r0", "r1", "r2"]
        finally:
            await client.close()
            await srv.stop(0)
        # the step thread ends with the server (it ran the larger steps)
        deadline = time.monotonic() + 5
        while _step_threads() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert not _step_threads()
        closed = GrpcExecutorClient(f"127.0.0.1:{srv.bound_port}", timeout=2)
        with pytest.raises(Unavailable, match="executor at 127.0.0.1"):
            await closed.info()
        await closed.close()

    asyncio.run(scenario())


def test_health_answers_while_a_step_runs(tiny_model_dir, make_engine, monkeypatch) -> None:
    engine = make_engine(tiny_model_dir("llama"))
    slow_execute = engine.runner.execute

    def slow(*args, **kwargs):
        time.sleep(1.5)
        return slow_execute(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "execute", slow)

    async def scenario() -> None:
        srv = await server.start_server(engine, "127.0.0.1", 0)
        address = f"127.0.0.1:{srv.bound_port}"
        client = GrpcExecutorClient(address)
        channel = grpc.aio.insecure_channel(address)
        try:
            new = [NewRequestData("r", [5, 6, 7], [], GREEDY, [0], 0, 3)]
            step = asyncio.create_task(client.execute_step(StepInput(0, engine.epoch, new_requests=new)))
            await asyncio.sleep(0.3)
            started = time.perf_counter()
            for service in ("", SERVICE_NAME):
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=1.0
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert time.perf_counter() - started < 1.0 and not step.done()
            assert len((await step).sampled) == 1
        finally:
            await channel.close()
            await client.close()
            await srv.stop(0)

    asyncio.run(scenario())


def test_executor_command_serves_until_sigterm(tiny_model_dir) -> None:
    port = free_port()
    cmd = [
        sys.executable, "-m", "pagedserve.cli", "executor", "--model", str(tiny_model_dir("gpt2")),
        "--port", str(port), "--num-kv-blocks", "64", "--block-size", "8", "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not health_check(f"127.0.0.1:{port}", SERVICE_NAME):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "executor did not become SERVING"
            time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        log = proc.stdout.read()
        assert code == 0, log[-4000:]
        assert "KV pool: 64 blocks x 8 tokens = 512 tokens" in log and f"serving on 127.0.0.1:{port}" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_main_fails_with_the_reason_when_the_pool_is_too_small(tiny_model_dir, caplog) -> None:
    parser = argparse.ArgumentParser()
    server.add_arguments(parser)
    args = parser.parse_args(
        ["--model", str(tiny_model_dir("llama")), "--num-kv-blocks", "3", "--device", "cpu"]
    )
    assert server.main(args) == 1
    assert "the KV pool is too small: 3 blocks" in caplog.text
    args = parser.parse_args(["--model", "x", "--block-size", "12"])
    assert server.main(args) == 2
    assert "--block-size must be a power of two" in caplog.text
    assert server.parse_bytes("512MiB") == 512 * 2**20 and server.parse_bytes("2GB") == 2 * 10**9


def test_short_steps_run_on_the_event_loop_only_while_steps_are_fast(
    tiny_model_dir, make_engine, monkeypatch
) -> None:
    from pagedserve.executor.servicer import INLINE_STEP_SECONDS, INLINE_STEP_TOKENS, ExecutorServicer

    servicer = ExecutorServicer(make_engine(tiny_model_dir("llama")))
    decode = StepInput(0, "", cached_requests=[CachedRequestData("r", [], 1, 5)] * 8)
    long = StepInput(
        0, "", new_requests=[NewRequestData("r", [5] * 300, [], GREEDY, [0], 0, INLINE_STEP_TOKENS)]
    )
    assert not servicer._runs_inline(decode), "no history yet: a worker thread"
    servicer._recent.extend([0.01] * 4)
    assert servicer._runs_inline(decode) and not servicer._runs_inline(long)
    servicer._recent.append(INLINE_STEP_SECONDS)  # one slow step: the thread again
    assert not servicer._runs_inline(decode)
    monkeypatch.setenv("PAGEDSERVE_INLINE_STEPS", "0")
    off = ExecutorServicer(servicer.engine)
    off._recent.extend([0.01] * 4)
    assert not off._runs_inline(decode)
