"""Fixtures for the executor tests: tiny random models saved once per session, engines on them."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from executor_harness import save_tiny_model

from pagedserve.executor.config import ExecutorConfig
from pagedserve.executor.engine import ExecutorEngine


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach the Hugging Face hub fails the test instead of hanging."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`tiny_model_dir(family)`: a folder with a random-weight tiny model of that family (made once)."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = save_tiny_model(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return made[family]

    return get


# PAGEDSERVE_TEST_DEVICE=cuda builds every engine on the GPU with the Triton kernels and CUDA graphs
# of decode steps, as the executor serves there (bench/gpu_device_check.sh runs the token-identity
# tests so); CI and every machine without a GPU use the CPU and the torch backend.
TEST_DEVICE = os.environ.get("PAGEDSERVE_TEST_DEVICE", "cpu")


@pytest.fixture
def make_engine() -> Callable[..., ExecutorEngine]:
    """`make_engine(model_path, **ExecutorConfig fields)`: an engine built the way the server builds
    it, on the CPU (or on TEST_DEVICE)."""

    def make(model: str | Path, **overrides) -> ExecutorEngine:
        fields = {
            "device": TEST_DEVICE,
            "attention_backend": "triton" if TEST_DEVICE == "cuda" else "torch",
            "block_size": 8,
            "num_kv_blocks": 128,
            **overrides,
        }
        engine = ExecutorEngine.from_config(ExecutorConfig(model=str(model), **fields))
        if TEST_DEVICE == "cuda" and not fields.get("enforce_eager"):
            assert engine.runner.decode_graphs is not None, "CUDA graphs were not captured (see the log)"
        return engine

    return make
