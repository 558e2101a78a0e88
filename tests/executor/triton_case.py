"""Token identity through the Triton kernels, run by test_triton_backend.py in a subprocess with
TRITON_INTERPRET=1 (which must be set before triton is imported). Small on purpose: the interpreter
runs every kernel program through numpy on CPU."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from executor_harness import VOCAB, StepDriver, make_prompts, reference_greedy, save_tiny_model

from pagedserve.executor.config import ExecutorConfig
from pagedserve.executor.engine import ExecutorEngine

MAX_NEW_TOKENS = 6


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    with tempfile.TemporaryDirectory() as tmp:
        path = save_tiny_model("llama", Path(tmp) / "llama")
        prompts = make_prompts((3, 10, 17), VOCAB, seed=4)
        expected = reference_greedy(path, prompts, MAX_NEW_TOKENS)
        config = ExecutorConfig(
            model=str(path),
            device="cpu",
            attention_backend="triton",
            block_size=8,
            num_kv_blocks=24,
            max_model_len=32,
        )
        engine = ExecutorEngine.from_config(config)
        assert engine.info().attention_backend == "triton"
        got = StepDriver(engine, seed=1).run(prompts, MAX_NEW_TOKENS, num_chunks=2, stagger=2)
    print("expected", expected)
    print("got     ", got)
    return 0 if got == expected else 1


if __name__ == "__main__":
    sys.exit(main())
