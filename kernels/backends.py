"""Choosing the implementation of the paged-KV operations that the executor calls.

Both backends read and write the same pool layout, [num_blocks, block_size, num_kv_heads, head_dim]
per layer, so the choice never changes what is cached; see `torch_backend` and the Triton kernel
modules for the tensor contracts.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from typing import NamedTuple, Protocol

import torch

BACKEND_NAMES = ("torch", "triton")


class PagedAttentionStep(Protocol):
    """One forward's paged-KV operations, made once per step from its metadata and called by every
    layer with that layer's pool tensors; a backend may derive what all layers share once here."""

    def write_kv(
        self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> None:
        """`reshape_and_cache` of this step's tokens: key/value [T, Hkv, D]."""

    def attend(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        """`paged_attention` of this step's tokens into `out`: query and out [T, H, D]."""


class KernelStep:
    """A `PagedAttentionStep` that hands the step's metadata to the kernels in every layer (the
    Triton kernels take it as it is; nothing to derive once)."""

    def __init__(
        self,
        backend: AttentionBackend,
        slot_mapping: torch.Tensor,  # [T] int64
        block_table: torch.Tensor,  # [S, max_blocks] int32
        seq_lens: torch.Tensor,  # [S] int32
        cu_seqlens_q: torch.Tensor,  # [S + 1] int32
        block_size: int,
    ) -> None:
        self.backend = backend
        self.slot_mapping = slot_mapping
        self.block_table = block_table
        self.seq_lens = seq_lens
        self.cu_seqlens_q = cu_seqlens_q

    def write_kv(
        self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> None:
        self.backend.reshape_and_cache(key, value, k_cache, v_cache, self.slot_mapping)

    def attend(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        self.backend.paged_attention(
            query, k_cache, v_cache, self.block_table, self.seq_lens, self.cu_seqlens_q, scale, out=out
        )


class AttentionBackend(NamedTuple):
    name: str
    reshape_and_cache: Callable[..., None]
    paged_attention: Callable[..., torch.Tensor]
    copy_blocks: Callable[..., None]
    # (slot_mapping, block_table, seq_lens, cu_seqlens_q, block_size) -> the step's PagedAttentionStep
    step_type: Callable[..., PagedAttentionStep] | None = None

    def prepare_step(
        self,
        slot_mapping: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        block_size: int,
    ) -> PagedAttentionStep:
        """The per-step object every layer calls (see `PagedAttentionStep`)."""
        if self.step_type is None:
            return KernelStep(self, slot_mapping, block_table, seq_lens, cu_seqlens_q, block_size)
        return self.step_type(slot_mapping, block_table, seq_lens, cu_seqlens_q, block_size)


_SPLIT_DECODE = contextvars.ContextVar("pagedserve_split_decode_contexts", default=False)


@contextlib.contextmanager
def splitting_decode_contexts() -> Iterator[None]:
    """Inside: the Triton paged attention splits the contexts of decode steps of few sequences
    (kernels/paged_attention.py; what CUDA graphs of decode steps are captured under)."""
    token = _SPLIT_DECODE.set(True)
    try:
        yield
    finally:
        _SPLIT_DECODE.reset(token)


def decode_contexts_split() -> bool:
    return _SPLIT_DECODE.get()


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
        from .torch_backend import (
            TorchAttentionStep,
            copy_blocks_torch,
            paged_attention_torch,
            reshape_and_cache_torch,
        )

        return AttentionBackend(
            "torch", reshape_and_cache_torch, paged_attention_torch, copy_blocks_torch, TorchAttentionStep
        )
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
