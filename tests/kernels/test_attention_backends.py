"""get_attention_backend: defaults per device, explicit choices, and errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pagedserve import kernels
from pagedserve.kernels import AttentionBackend, get_attention_backend


def test_default_is_torch_on_cpu_and_triton_on_cuda() -> None:
    cpu = get_attention_backend(None, "cpu")
    assert isinstance(cpu, AttentionBackend) and cpu.name == "torch"
    assert cpu.paged_attention is kernels.paged_attention_torch
    assert cpu.reshape_and_cache is kernels.reshape_and_cache_torch
    assert cpu.copy_blocks is kernels.copy_blocks_torch
    assert get_attention_backend(None, "cuda").name == "triton"


def test_triton_on_cpu_only_when_interpreted(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = get_attention_backend("triton", "cpu")  # conftest sets TRITON_INTERPRET=1
    assert backend.paged_attention is kernels.paged_attention
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        get_attention_backend("triton", "cpu")


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"'flash'.*\['torch', 'triton'\]"):
        get_attention_backend("flash", "cpu")


def test_package_imports_without_triton() -> None:
    # A triton that fails to import must leave the torch backend usable.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "from pagedserve.kernels import get_attention_backend, paged_attention_torch\n"
        "import pagedserve.kernels as k\n"
        "assert get_attention_backend(None, 'cpu').name == 'torch'\n"
        "assert not hasattr(k, 'paged_attention')\n"
        "try:\n"
        "    get_attention_backend('triton', 'cuda')\n"
        "except ValueError as e:\n"
        "    assert 'triton' in str(e)\n"
        "else:\n"
        "    raise SystemExit('expected ValueError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
