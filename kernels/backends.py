"""Choosing the implementation of the paged-KV operations that the executor calls.

Both backends read and write the same pool layout, [num_blocks, block_size, num_kv_heads, head_dim]
per layer, so the choice never changes what is cached; see `torch_backend` and the Triton kernel
modules for the tensor contracts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import torch

BACKEND_NAMES = ("torch", "triton")


class AttentionBackend(NamedTuple):
    name: str
    reshape_and_cache: Callable[..., None]
    paged_attention: Callable[..., torch.Tensor]
    copy_blocks: Callable[..., None]


def is_triton_interpreted() -> bool:
    """True when TRITON_INTERPRET is set: Triton kernels then run on CPU through numpy."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def get_attention_backend(name: str | None, device: torch.device | str) -> AttentionBackend:
    """Returns the named backend; None picks "triton" on CUDA and "torch" elsewhere.

    "triton" off CUDA only works under TRITON_INTERPRET=1 (a slow interpreter, for tests).
    """
    device = torch.device(device)
    if name is None:
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        from .torch_backend import copy_blocks_torch, paged_attention_torch, reshape_and_cache_torch

        return AttentionBackend("torch", reshape_and_cache_torch, paged_attention_torch, copy_blocks_torch)
    if name == "triton":
        if device.type != "cuda" and not is_triton_interpreted():
            raise ValueError(
                f"attention backend 'triton' needs a CUDA device, got {device}; on CPU it runs only "
                "under TRITON_INTERPRET=1 (for tests); use 'torch' instead"
            )
        try:
            from .copy_blocks import copy_blocks
            from .paged_attention import paged_attention
            from .reshape_and_cache import reshape_and_cache
        except ImportError as e:
            raise ValueError(
                f"attention backend 'triton' is unavailable: triton failed to import ({e})"
            ) from e
        return AttentionBackend("triton", reshape_and_cache, paged_attention, copy_blocks)
    raise ValueError(f"unknown attention backend {name!r}; choose one of {list(BACKEND_NAMES)}")
