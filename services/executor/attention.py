"""pagedserve's attention as transformers sees it: a function registered with `AttentionInterface`.

transformers calls `pagedserve_attention` in every attention layer with query `[1, H, T, D]` and
key/value `[1, Hkv, T, D]` for the step's flat batch of T tokens; the `StepMetadata` that
`ModelRunner` passes to the model as the keyword `pagedserve_step` arrives in `**kwargs`. The function
writes the new K/V into the layer's pool tensors (`reshape_and_cache`), attends over the pool through
the block tables (`paged_attention`) and returns `[1, T, H, D]`. No dense mask is built: the kernels
apply causality and sequence boundaries from the metadata, so the registered mask function returns None.

An `AttentionProbe` in place of the metadata makes a load-time forward record every call instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.kernels.backends import PagedAttentionStep

ATTN_IMPLEMENTATION = "pagedserve"
STEP_KWARG = "pagedserve_step"  # the keyword that carries StepMetadata to the attention function
LAYER_ATTR = "_pagedserve_layer"  # pool layer of an attention module, set by the probe
# Keyword arguments some architectures pass to the attention function that our kernels do not
# implement; a non-None value means the model needs them (logit soft-capping, attention sinks).
UNSUPPORTED_ATTENTION_KWARGS = ("softcap", "s_aux", "sinks")


class MissingStepMetadata(RuntimeError):
    """The attention function ran without the step's metadata: the model was called directly, or
    its modules do not pass extra keyword arguments through to the attention function."""


@dataclass(slots=True)
class StepMetadata:
    """What every layer's attention needs for one forward; one object shared by all layers."""

    paged: PagedAttentionStep  # the backend's per-step state: slots, block tables, its attention plan
    k_caches: list[torch.Tensor]  # per layer [num_blocks, block_size, Hkv, D]
    v_caches: list[torch.Tensor]


@dataclass(slots=True)
class AttentionProbe:
    """Passed instead of StepMetadata during the load-time probe: records each attention call."""

    modules: list[nn.Module] = field(default_factory=list)
    layouts: list[tuple[int, int, int, torch.dtype]] = field(default_factory=list)  # (H, Hkv, D, dtype)
    sliding_windows: list[int | None] = field(default_factory=list)
    unsupported: set[str] = field(default_factory=set)


def _probe_attention(probe: AttentionProbe, module, query, key, value, scaling, kwargs) -> torch.Tensor:
    probe.modules.append(module)
    probe.layouts.append((query.shape[1], key.shape[1], key.shape[3], key.dtype))
    window = kwargs.get("sliding_window")
    probe.sliding_windows.append(int(window) if window is not None and window > 0 else None)
    probe.unsupported.update(k for k in UNSUPPORTED_ATTENTION_KWARGS if kwargs.get(k) is not None)
    # Plain causal attention over the probe's one sequence, so later layers see sane values.
    group = query.shape[1] // key.shape[1]
    out = F.scaled_dot_product_attention(
        query,
        key.repeat_interleave(group, 1),
        value.repeat_interleave(group, 1),
        is_causal=True,
        scale=scaling,
    )  # [1, H, T, D]
    return out.transpose(1, 2)  # [1, T, H, D]


def pagedserve_attention(
    module: nn.Module,
    query: torch.Tensor,  # [1, H, T, D]
    key: torch.Tensor,  # [1, Hkv, T, D]
    value: torch.Tensor,  # [1, Hkv, T, D]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The attention function registered with transformers: returns ([1, T, H, D], None)."""
    step = kwargs.get(STEP_KWARG)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if isinstance(step, AttentionProbe):
        return _probe_attention(step, module, query, key, value, scaling, kwargs), None
    if step is None:
        raise MissingStepMetadata(
            f"the '{ATTN_IMPLEMENTATION}' attention was called without step metadata; "
            f"call the model through ModelRunner, which passes {STEP_KWARG}=..."
        )
    layer = getattr(module, LAYER_ATTR)
    if step is COMPILED_STEP:
        # Traced by torch.compile: one opaque op, so the graph does not break on the paged KV.
        return torch.ops.pagedserve.paged_attention(query, key, value, layer, float(scaling)), None
    return _attend_layer(step, layer, query, key, value, scaling), None


def _attend_layer(
    step: StepMetadata,
    layer: int,
    query: torch.Tensor,  # [1, H, T, D]
    key: torch.Tensor,  # [1, Hkv, T, D]
    value: torch.Tensor,  # [1, Hkv, T, D]
    scale: float,
) -> torch.Tensor:
    """Writes this layer's new K/V into the pool and attends over it; returns [1, T, H, D]."""
    k_cache, v_cache = step.k_caches[layer], step.v_caches[layer]
    q = query[0].transpose(0, 1)  # [T, H, D]
    step.paged.write_kv(key[0].transpose(0, 1), value[0].transpose(0, 1), k_cache, v_cache)
    out = q.new_empty(q.shape)  # [T, H, D]
    step.paged.attend(q, k_cache, v_cache, scale, out)
    return out.unsqueeze(0)  # [1, T, H, D]


class _CompiledStep:
    """The one object a compiled forward gets as its STEP_KWARG, the same every step, so that
    torch.compile's guards on it never change; the step's real metadata is set here around each
    call (`running`) and read by the custom op when it runs, outside the graph."""

    def __init__(self) -> None:
        self.step: StepMetadata | None = None

    def running(self, step: StepMetadata) -> _CompiledStep:
        self.step = step
        return self

    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc: object) -> None:
        self.step = None


COMPILED_STEP = _CompiledStep()


@torch.library.custom_op("pagedserve::paged_attention", mutates_args=())
def paged_attention_op(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, scale: float
) -> torch.Tensor:
    """One layer's KV write and paged attention for a compiled forward: query [1, H, T, D],
    key/value [1, Hkv, T, D] -> [1, T, H, D]. The pool and the step's metadata are not arguments:
    they come from COMPILED_STEP, so the graph's inputs stay the model's own. Writing the pool is a
    side effect the graph does not see, which is safe: only this layer's own op reads its pool layer,
    and the op's output feeds the rest of the layer, so it is never dropped or reordered past its use."""
    step = COMPILED_STEP.step
    if step is None:
        raise MissingStepMetadata("pagedserve::paged_attention ran outside a compiled step")
    return _attend_layer(step, layer, query, key, value, scale)


@paged_attention_op.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
    _, num_heads, num_tokens, head_dim = query.shape
    return query.new_empty((1, num_tokens, num_heads, head_dim))


_registered = False


def register_attention() -> None:
    """Registers pagedserve's attention and its (absent) mask with transformers, once per process."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, pagedserve_attention)
    # The kernels apply causality and sequence boundaries from the metadata; no dense mask is built.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, lambda *args, **kwargs: None)
    _registered = True
