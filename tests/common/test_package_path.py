"""The repository root on sys.path (`python -m` / `python -c` run from it, as the Makefile and the
tests do) must not make the repository's `kernels/` folder the top-level `kernels`: transformers
(5.25 on) requires and imports the `kernels` distribution of that name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pagedserve

ROOT = Path(pagedserve.__file__).resolve().parent.parent

CHILD = """
import importlib.util
def where():
    spec = importlib.util.find_spec("kernels")
    return spec.origin if spec is not None else None
before = where()
import pagedserve
from pagedserve.kernels import cpu_native
print(before)
print(where())
print(cpu_native.__file__)
"""


def test_the_repository_root_does_not_hide_the_kernels_distribution() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    before, after, ours = done.stdout.split()
    assert before == str(ROOT / "kernels" / "__init__.py"), "the root is on sys.path: the case this guards"
    assert after != before, after  # the installed distribution, or none
    assert ours == str(ROOT / "kernels" / "cpu_native.py"), "pagedserve.kernels still is the repository's"
