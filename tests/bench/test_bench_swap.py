"""The swap benchmark's trace and the flags its stacks get (the runs themselves are the bench's)."""

from __future__ import annotations

from pagedserve.bench.stack import LaunchedStack, StackConfig
from pagedserve.bench.swap_bench import VOCAB, trace


def test_trace_is_seeded_random_ids_of_the_vocabulary() -> None:
    prompts = trace(requests=5, prompt_len=12, seed=3)
    assert len(prompts) == 5 and all(len(p) == 12 for p in prompts)
    assert all(3 <= t < VOCAB for p in prompts for t in p)
    assert trace(5, 12, seed=3) == prompts != trace(5, 12, seed=4)


def test_extra_flags_reach_pagedserve_up() -> None:
    config = StackConfig("m", 48, extra_args=("--preemption-mode", "swap", "--swap-space", "0.25"))
    command = LaunchedStack(config).command()
    assert command[command.index("--preemption-mode") + 1] == "swap"
    assert command[command.index("--swap-space") + 1] == "0.25"
    assert command.count("--preemption-mode") == 1  # once, not repeated after the ports
    assert "--swap-space" not in LaunchedStack(StackConfig("m", 48)).command()
