"""The executor on the Triton kernels (interpreted on CPU) is token-identical to `generate`:
one small case with chunked prefill, staggered arrivals and shuffled block tables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_triton_backend_matches_generate() -> None:
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # no empty entry: that would be the working directory, the repository root, whose
        # kernels/ folder hides the `kernels` distribution transformers imports
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH")) if p
        ),
    }
    proc = subprocess.run(
        [sys.executable, str(HERE / "triton_case.py")], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
