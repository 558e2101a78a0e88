"""Shared builders for the kernel tests.

TRITON_INTERPRET must be set before triton is first imported (`triton.jit` picks the compiler or
the numpy interpreter when each function, triton's own helpers included, is decorated), so it is set
here, at collection. The Triton kernels then run on CPU through numpy: slow, so every shape in these
tests is tiny. If another test package imported triton before this file ran, without
TRITON_INTERPRET=1 in the environment, the Triton tests cannot run and fail with that reason
(tests/conftest.py sets TRITON_INTERPRET=1 first, so a full run is never in that state).
"""

from __future__ import annotations

import os
import sys

# Decided before setting the variable: was triton already imported in compiled mode?
_TRITON_IMPORTED_COMPILED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Callable  # noqa: E402

import pytest  # noqa: E402

from pagedserve.kernels.testing import PagedBatch, build_paged_batch  # noqa: E402

# The tests hand CPU tensors to the Triton kernels, which only the interpreter accepts.
TRITON_RUNNABLE = os.environ["TRITON_INTERPRET"] == "1" and not _TRITON_IMPORTED_COMPILED


@pytest.fixture(autouse=True)
def _fail_triton_when_not_runnable(request: pytest.FixtureRequest) -> None:
    # Every test that launches a Triton kernel has "triton" in its name or parameter id.
    if "triton" in request.node.name and not TRITON_RUNNABLE:
        pytest.fail("the Triton tests need TRITON_INTERPRET=1 set before anything imports triton")


@pytest.fixture
def paged_batch() -> Callable[..., PagedBatch]:
    return build_paged_batch
