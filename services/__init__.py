"""pagedserve: PagedAttention LLM serving as separate gRPC services."""

from __future__ import annotations

import os
import sys
from pathlib import Path

__version__ = "0.1.0"


def _stop_shadowing_kernels() -> None:
    """In a source checkout, drop the repository root from sys.path. pagedserve's packages map onto
    the root's folders (`kernels/` is pagedserve.kernels) and come through the editable install,
    not through the root; with the root on sys.path (`python -m` or `python -c` run from it), its
    `kernels/` is also a top-level `kernels`, which hides the `kernels` distribution that
    transformers (5.25 on) requires and imports. An installed wheel has nothing of the root. (A
    process that imports transformers' model classes before pagedserve, with the root on
    sys.path, has failed before this runs.)"""
    here = Path(__file__).resolve().parent
    if here.name != "services" or not (here.parent / "kernels" / "__init__.py").is_file():
        return
    root = here.parent

    def is_root(entry: str) -> bool:
        try:
            return Path(entry or os.getcwd()).resolve() == root
        except OSError:
            return False

    sys.path[:] = [entry for entry in sys.path if not is_root(entry)]


_stop_shadowing_kernels()
