"""Fixtures for the launcher's tests."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pagedserve.common.models import BUNDLED_MODEL, REPO_ROOT
from pagedserve.launch_plan import module_available


@pytest.fixture(scope="session")
def up_model(tmp_path_factory) -> str:
    """The model `pagedserve up` serves in these tests: the bundled one when it is there,
    else a throwaway one made by the repository's own training script in seconds (same
    files and tokenizer format, near-random weights). Nothing is made while no service
    that loads a model exists."""
    if (BUNDLED_MODEL / "config.json").exists():
        return str(BUNDLED_MODEL)
    out = tmp_path_factory.mktemp("tiny-model")
    if not (module_available("tokenizer") or module_available("executor")):
        return str(out)
    tiny = ["--max-corpus-bytes", "300000", "--vocab-size", "300", "--hidden-size", "32", "--num-layers", "1",
            "--num-heads", "2", "--num-kv-heads", "1", "--intermediate-size", "64", "--steps", "1",
            "--batch-size", "1", "--seq-len", "16", "--max-chat-examples", "10"]  # fmt: skip
    script = REPO_ROOT / "models" / "train.py"
    if not script.exists():
        pytest.fail(f"neither the bundled model ({BUNDLED_MODEL}) nor {script} to make a tiny one is there")
    done = subprocess.run(
        [sys.executable, str(script), "--out", str(out), *tiny], capture_output=True, text=True, timeout=300
    )
    if done.returncode != 0:
        pytest.fail(f"{script} could not make a tiny model (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return str(out)
