"""--cpu-threads and --cpu-affinity: parsing, the default rule, and that the engine applies them."""

from __future__ import annotations

import argparse
import ast
import logging
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

from pagedserve.common.cpus import available_cores, format_cpu_list, parse_cpu_list
from pagedserve.common.params import SamplingParams
from pagedserve.common.step import CachedRequestData, NewRequestData, StepInput
from pagedserve.executor.config import ExecutorConfig
from pagedserve.executor.placement import (
    PREFILL_STEP_TOKENS,
    apply_placement,
    default_prefill_threads,
    default_threads,
)
from pagedserve.executor.server import add_arguments, config_from_args


@pytest.fixture(autouse=True)
def keep_threads() -> Iterator[None]:
    """Placement is process-wide: give the other tests back the thread count they started with."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cpu_list_syntax() -> None:
    assert parse_cpu_list("0") == (0,)
    assert parse_cpu_list("3,0-2, 5") == (0, 1, 2, 3, 5)
    assert format_cpu_list((0, 1, 2, 3, 5, 7, 8)) == "0-3,5,7-8"
    assert parse_cpu_list(format_cpu_list((1, 4, 5, 6))) == (1, 4, 5, 6)
    for bad in ("", "a", "3-1", "1-x", "-1"):
        with pytest.raises(ValueError, match="--cpu-affinity"):
            parse_cpu_list(bad)


def test_default_threads_leave_one_core_unless_pinned() -> None:
    assert [default_threads(n, pinned=False) for n in (1, 2, 4, 16)] == [1, 1, 3, 15]
    assert [default_threads(n, pinned=True) for n in (1, 2, 4)] == [1, 2, 4]


def test_flags_reach_the_config() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--cpu-threads", "3", "--cpu-affinity", "0,2-3"]))
    assert config.cpu_threads == 3 and config.cpu_affinity == (0, 2, 3)
    assert config_from_args(parser.parse_args([])).cpu_threads is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--cpu-affinity", "zero"])
    with pytest.raises(ValueError, match="--cpu-threads"):
        ExecutorConfig(cpu_threads=0).validate()


def test_explicit_threads_and_the_cpu_default_are_applied() -> None:
    placement = apply_placement(1, None, "cpu")
    assert placement.threads == torch.get_num_threads() == 1
    placement = apply_placement(None, None, "cpu")
    assert placement.threads == torch.get_num_threads() == max(1, len(available_cores()) - 1)
    assert not placement.pinned


def test_affinity_pins_the_process() -> None:
    # In a child process: pinning this test process would slow every later test. Every thread
    # is pinned, those started before too (torch starts one at import; here also one of ours).
    core = available_cores()[-1]
    code = (
        "import os, threading, torch\n"
        "from pagedserve.executor.placement import apply_placement\n"
        "stop = threading.Event()\n"
        "threading.Thread(target=stop.wait).start()\n"
        f"p = apply_placement(None, ({core},), 'cpu')\n"
        "tasks = os.listdir('/proc/self/task')\n"
        "every = sorted(set().union(*(os.sched_getaffinity(int(t)) for t in tasks)))\n"
        "print(sorted(os.sched_getaffinity(0)), torch.get_num_threads(), p.pinned, len(tasks), every)\n"
        "stop.set()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    mine, threads, pinned, tasks, every = out.split()
    assert (mine, threads, pinned, every) == (f"[{core}]", "1", "True", f"[{core}]")
    assert int(tasks) >= 3


def test_affinity_outside_the_machine_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="cannot pin"):
        apply_placement(None, (10_000,), "cpu")


def test_engine_applies_and_logs_the_thread_count(tiny_model_dir, make_engine, caplog) -> None:
    path = tiny_model_dir("llama")
    torch.set_num_threads(2)
    with caplog.at_level(logging.INFO, logger="pagedserve.executor.engine"):
        make_engine(path, cpu_threads=1)
    assert torch.get_num_threads() == 1
    assert "1 torch threads (--cpu-threads)" in caplog.text


def test_prefill_threads_default_and_flag() -> None:
    # On CPU, unpinned: every core for prefill-heavy steps; pinned or on CUDA: the step threads.
    assert default_prefill_threads(1, 2, pinned=False, device_type="cpu") == 2
    assert default_prefill_threads(3, 4, pinned=False, device_type="cpu") == 4
    assert default_prefill_threads(2, 2, pinned=True, device_type="cpu") == 2
    assert default_prefill_threads(4, 16, pinned=False, device_type="cuda") == 4
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args(["--prefill-threads", "3"])).prefill_threads == 3
    with pytest.raises(ValueError, match="--prefill-threads"):
        ExecutorConfig(prefill_threads=0).validate()


def test_prefill_heavy_steps_run_with_the_prefill_threads(tiny_model_dir, make_engine, caplog) -> None:
    # A step of PREFILL_STEP_TOKENS+ tokens runs its forward with --prefill-threads, then the engine
    # goes back to --cpu-threads; smaller steps (decodes) never change the count.
    path = tiny_model_dir("llama")
    with caplog.at_level(logging.INFO, logger="pagedserve.executor.engine"):
        engine = make_engine(
            path, cpu_threads=1, prefill_threads=2, num_kv_blocks=256, max_num_batched_tokens=512
        )
    assert f"2 torch threads for steps of {PREFILL_STEP_TOKENS}+ tokens" in caplog.text
    seen = []
    execute = engine.runner.execute

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return execute(*args, **kwargs)

    engine.runner.execute = spy
    n = PREFILL_STEP_TOKENS // 2 + 5  # two prompts: one step of PREFILL_STEP_TOKENS + 10 tokens
    prompt = [(3 * i + 1) % engine.runner.vocab_size for i in range(n)]
    per_seq = -(-(n + 2) // 8)
    new = [
        NewRequestData(
            f"r{i}",
            prompt,
            [],
            SamplingParams(temperature=0.0),
            list(range(i * per_seq, (i + 1) * per_seq)),
            0,
            n,
        )
        for i in range(2)
    ]
    engine.execute_step(StepInput(1, engine.epoch, new_requests=new))
    decode = [CachedRequestData(f"r{i}", [], 1, n) for i in range(2)]
    engine.execute_step(StepInput(2, engine.epoch, cached_requests=decode))
    assert seen == [2, 1]
    assert torch.get_num_threads() == 1
    engine.execute_step(StepInput(3, engine.epoch, forget_request_ids=["r0", "r1"]))


CHILD_PREFILL = """
import random, resource, sys
from pagedserve.bench.executor_bench import Bench
from pagedserve.common.models import default_model
from pagedserve.executor.config import ExecutorConfig
from pagedserve.executor.engine import ExecutorEngine
from pagedserve.executor.placement import keep_freed_memory

ok = keep_freed_memory() if sys.argv[1] == "1" else True
config = ExecutorConfig(model=default_model(), device="cpu", block_size=16, num_kv_blocks=600,
                        max_num_batched_tokens=4096, cpu_threads=1, prefill_threads=1)
bench = Bench(ExecutorEngine.from_config(config))
bench.prefill(14, 256, 260, 4096, min_prompt_len=32)
bench.reset()
bench.rng = random.Random(0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
bench.prefill(14, 256, 260, 4096, min_prompt_len=32)
print(ok, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_malloc_keeps_freed_memory_for_the_next_step() -> None:
    # A child process per setting (the executor's malloc setting is process-wide): the same
    # prefill step twice on the bundled model; the page faults of the second one. Both children
    # start with glibc's mmap threshold fixed at its initial 128 KiB, so that each activation is a
    # fresh mmap, page-faulted in as it is written (here about 56,000 faults a step). Left to
    # itself, glibc raises that threshold as large blocks are freed, so the default's faults fall
    # from step to step (once to none at all on the second step, which made this comparison
    # meaningless). keep_freed_memory() overrides the threshold: the second step reuses the pages
    # the first one freed.
    faults = {}
    for keep in ("0", "1"):
        ok, faults[keep] = _child_faults(CHILD_PREFILL, keep, {"MALLOC_MMAP_THRESHOLD_": str(128 << 10)})
        assert ok == "True"
    assert faults["0"] > 10_000, faults
    assert faults["1"] < faults["0"] // 3, faults


def _child_faults(code: str, arg: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    """Runs `code` in a child Python with `arg` (and `env` added to its environment); its last
    line's two fields: a word, page faults."""
    out = subprocess.run(
        [sys.executable, "-c", code, arg],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    word, count = out.stdout.split()[-2:]
    return word, int(count)


CHILD_SERVED_PREFILL = """
import asyncio, random, resource, sys
from pagedserve.common.models import default_model
from pagedserve.common.params import SamplingParams
from pagedserve.common.step import NewRequestData, StepInput
from pagedserve.executor.client import GrpcExecutorClient
from pagedserve.executor.config import ExecutorConfig
from pagedserve.executor.engine import ExecutorEngine
from pagedserve.executor.placement import keep_freed_memory
from pagedserve.executor.server import start_server

keep_freed_memory()  # as `pagedserve executor` does
config = ExecutorConfig(model=default_model(), device="cpu", block_size=16, num_kv_blocks=600,
                        max_num_batched_tokens=2048, cpu_threads=1, prefill_threads=1)
engine = ExecutorEngine.from_config(config)
if sys.argv[1] == "0":
    engine.warm_up_tokens = 0
rng = random.Random(0)
new, block = [], 0
for i in range(14):  # a burst's first step: 14 prompts of 32-140 tokens
    n = rng.randint(32, 140)
    blocks = list(range(block, block + (n + 15) // 16))
    block += len(blocks)
    prompt = [rng.randrange(4096) for _ in range(n)]
    new.append(NewRequestData(f"r{i}", prompt, [], SamplingParams(temperature=0.0), blocks, 0, n))

async def main():
    server = await start_server(engine, "127.0.0.1", 0)
    client = GrpcExecutorClient(f"127.0.0.1:{server.bound_port}")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = await client.execute_step(StepInput(0, engine.epoch, new_requests=new))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    await client.close()
    await server.stop(0)
    print(len(out.sampled), faults)

asyncio.run(main())
"""


def test_served_first_heavy_step_finds_its_memory_warm() -> None:
    # The executor server warms up with a heavy step on the thread that runs the steps (each
    # thread allocates from its own arena), so the first real prefill step of a burst reuses the
    # pages the warm-up page-faulted in. A child process per setting: the page faults of that
    # first step, served over gRPC, with the warm-up and without it.
    faults = {}
    for warm in ("0", "1"):
        sampled, faults[warm] = _child_faults(CHILD_SERVED_PREFILL, warm)
        assert sampled == "14"
    assert faults["1"] < faults["0"] // 4, faults


CHILD_WIDEN = """
import os, sys, threading, torch
from pagedserve.common.params import SamplingParams
from pagedserve.common.step import CachedRequestData, NewRequestData, StepInput
from pagedserve.executor.config import ExecutorConfig
from pagedserve.executor.engine import ExecutorEngine
from pagedserve.executor.placement import PREFILL_STEP_TOKENS
from pagedserve.kernels import cpu_native

cores = sorted(os.sched_getaffinity(0))
engine = ExecutorEngine.from_config(ExecutorConfig(
    model=sys.argv[1], device="cpu", attention_backend="torch", block_size=8, num_kv_blocks=256,
    max_num_batched_tokens=512, cpu_affinity=(cores[0],), prefill_threads=len(cores)))
seen, spread = [], []
execute = engine.runner.execute
helpers = cpu_native.helpers()
helper_tids = set(helpers.tids) if helpers is not None else set()

def threads_cores():
    # every thread's cores (torch's pool threads included), the core helpers apart
    tasks = [int(t) for t in os.listdir("/proc/self/task")]
    mine = [os.sched_getaffinity(t) for t in tasks if t not in helper_tids]
    theirs = [os.sched_getaffinity(t) for t in tasks if t in helper_tids]
    return sorted(set().union(*mine)), sorted(set().union(*theirs))

def spy(*args, **kwargs):
    seen.append(threads_cores()[0])
    # the calling thread and each thread of its OpenMP team: one core each
    team = engine._teams.get(threading.get_native_id(), [])
    spread.append([sorted(os.sched_getaffinity(t)) for t in [threading.get_native_id(), *team]])
    return execute(*args, **kwargs)

engine.runner.execute = spy
n = PREFILL_STEP_TOKENS // 2 + 5  # two prompts: one step of PREFILL_STEP_TOKENS + 10 tokens
prompt = [(3 * i + 1) % engine.runner.vocab_size for i in range(n)]
per = -(-(n + 2) // 8)
new = [NewRequestData(f"r{i}", prompt, [], SamplingParams(temperature=0.0), list(range(i * per, (i + 1) * per)), 0, n)
       for i in range(2)]
engine.execute_step(StepInput(1, engine.epoch, new_requests=new))
decode = [CachedRequestData(f"r{i}", [], 1, n) for i in range(2)]
engine.execute_step(StepInput(2, engine.epoch, cached_requests=decode))
after, helper_cores = threads_cores()
print(repr((cores, seen[0], seen[1], after, engine.widen is not None, helper_cores, spread[0])))
"""


def test_heavy_steps_of_a_pinned_executor_spread_over_every_core(tiny_model_dir) -> None:
    # `pagedserve up`'s default placement: the executor pinned to all cores but one, with more
    # --prefill-threads than pinned cores. A heavy step runs on every core the process had before
    # pinning, each thread of its team on a core of its own; then all go back to the pinned
    # cores, where decodes run, sharing their decode attention and linears with a core helper
    # pinned to the core left over.
    # (A child process: pinning is process-wide.)
    path = tiny_model_dir("llama")
    out = subprocess.run(
        [sys.executable, "-c", CHILD_WIDEN, str(path)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    cores, heavy, decode, after, widened, helper_cores, spread = ast.literal_eval(
        out.stdout.strip().splitlines()[-1]
    )
    first = [cores[0]]
    assert decode == after == first
    if len(cores) > 1:
        assert widened and heavy == cores
        assert helper_cores == cores[1:]
        # not every thread on every core: the caller on its own, each team thread on the next one
        assert spread == [[c] for c in cores], spread
    else:  # nothing to spread over
        assert not widened and heavy == first and helper_cores == []


CHILD_HELPERS = """
import hashlib, os, sys
from pagedserve.common.params import SamplingParams
from pagedserve.common.step import CachedRequestData, NewRequestData, StepInput
from pagedserve.executor.config import ExecutorConfig
from pagedserve.executor.engine import ExecutorEngine
from pagedserve.kernels import cpu_native

cores = sorted(os.sched_getaffinity(0))
engine = ExecutorEngine.from_config(ExecutorConfig(
    model=sys.argv[1], device="cpu", attention_backend="torch", block_size=8, num_kv_blocks=512,
    max_num_batched_tokens=512, cpu_affinity=(cores[0],), prefill_threads=len(cores)))
digest = hashlib.sha256()
execute = engine.runner.execute

def spy(*args, **kwargs):
    logits = execute(*args, **kwargs)
    digest.update(logits.contiguous().numpy().tobytes())
    return logits

engine.runner.execute = spy
vocab = engine.runner.vocab_size
prefix = [(7 * i + 3) % vocab for i in range(40)]  # five shared blocks
new, tokens = [], {}
for i in range(12):
    prompt = prefix + [(5 * i + j) % vocab for j in range(3 + 2 * i)] if i < 8 else [(i + j) % vocab for j in range(9)]
    new.append(NewRequestData(f"r{i}", prompt, [], SamplingParams(temperature=0.0),
                              list(range(i * 16, (i + 1) * 16)), 0, len(prompt)))
    tokens[f"r{i}"] = len(prompt)
out = engine.execute_step(StepInput(1, engine.epoch, new_requests=new))
generated = {s.request_id: [s.token_id] for s in out.sampled}
for step in range(2, 18):
    decode = [CachedRequestData(r, [], 1, n + step - 2) for r, n in tokens.items()]
    for s in engine.execute_step(StepInput(step, engine.epoch, cached_requests=decode)).sampled:
        generated[s.request_id].append(s.token_id)
print(repr((cpu_native.helpers() is not None, digest.hexdigest(), sorted(generated.items()))))
"""


def test_core_helpers_leave_every_logit_unchanged(tiny_model_dir) -> None:
    # The pinned default on 2+ cores starts a core helper; the same prefills and decodes (shared
    # prefixes among them) give the same logits bit for bit, and so the same greedy tokens, as with
    # PAGEDSERVE_CORE_HELPERS=0. (Child processes: the helpers and pinning are process-wide.)
    path = tiny_model_dir("llama")
    runs = []
    for switch in ("1", "0"):
        env = {**os.environ, "PAGEDSERVE_CORE_HELPERS": switch}
        out = subprocess.run(
            [sys.executable, "-c", CHILD_HELPERS, str(path)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        runs.append(ast.literal_eval(out.stdout.strip().splitlines()[-1]))
    (helped, digest, tokens), (unhelped, digest0, tokens0) = runs
    assert helped == (len(os.sched_getaffinity(0)) > 1) and not unhelped
    assert len(tokens) == 12 and all(len(t) == 17 for _, t in tokens)
    assert tokens == tokens0
    assert digest == digest0
