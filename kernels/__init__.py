"""Operations over the paged KV pool: Triton kernels, their pure-torch references, and the
vectorized torch backend used on CPU.

Importing this package never requires triton to import: the torch backend and the backend
selector always load, and so does the attention reference (`attention_ref`, plain torch); the
Triton kernels, and the references kept beside them, are exported only when triton is usable.
"""

from __future__ import annotations

from .attention_ref import paged_attention_ref
from .backends import BACKEND_NAMES, AttentionBackend, get_attention_backend
from .swap_blocks import swap_blocks, swap_blocks_ref
from .torch_backend import copy_blocks_torch, paged_attention_torch, reshape_and_cache_torch

__all__ = [
    "BACKEND_NAMES",
    "AttentionBackend",
    "get_attention_backend",
    "paged_attention_ref",
    "copy_blocks_torch",
    "paged_attention_torch",
    "reshape_and_cache_torch",
    "swap_blocks",
    "swap_blocks_ref",
]

try:
    from .copy_blocks import copy_blocks, copy_blocks_ref
    from .paged_attention import paged_attention
    from .reshape_and_cache import reshape_and_cache, reshape_and_cache_ref
except ImportError:  # triton missing or broken: the torch backend still works
    pass
else:
    __all__ += [
        "copy_blocks",
        "copy_blocks_ref",
        "paged_attention",
        "reshape_and_cache",
        "reshape_and_cache_ref",
    ]
