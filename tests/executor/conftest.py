"""Fixtures for the executor tests: tiny random models saved once per session, engines on them."""

from __future__ import annotations

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


@pytest.fixture
def make_engine() -> Callable[..., ExecutorEngine]:
    """`make_engine(model_path, **ExecutorConfig fields)`: a CPU engine built the way the server builds it."""

    def make(model: str | Path, **overrides) -> ExecutorEngine:
        fields = {
            "device": "cpu",
            "attention_backend": "torch",
            "block_size": 8,
            "num_kv_blocks": 128,
            **overrides,
        }
        return ExecutorEngine.from_config(ExecutorConfig(model=str(model), **fields))

    return make
