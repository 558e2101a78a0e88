"""A lean eager forward for Llama-shaped decoders (Llama, Mistral, Qwen2) on the model's own weights.

transformers' forward for these models is a tree of modules, each call wrapped in hooks, keyword
plumbing, output dataclasses and decorators; at decode batch sizes on CPU, with a small model, that
Python costs as much as a third of a step. `LeanForward` runs the same tensor operations, in the same
order, with the same shapes and strides (down to the [1, H, T, D] views transformers attends on), so
its logits are the same bit for bit as the modules' (tests/executor/test_lean_forward.py); only the
Python between them is gone. The attention is pagedserve's own (`attention._attend_layer`).

It takes a model only when every layer is one of the known classes with the expected parts and no
hooks; anything else (and `PAGEDSERVE_LEAN_FORWARD=0`) keeps transformers' forward.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.common.switches import switched_on
from pagedserve.executor.attention import LAYER_ATTR, StepMetadata, _attend_layer

log = logging.getLogger(__name__)

ENV_SWITCH = "PAGEDSERVE_LEAN_FORWARD"
# Decoder layers whose forward is: x + attn(rms(x)), then x + mlp(rms(x)), rotary on q and k.
KNOWN_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
KNOWN_CAUSAL_LMS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class _Layer(NamedTuple):
    pool_layer: int
    norm1: torch.Tensor
    eps1: float
    q: tuple[torch.Tensor, torch.Tensor | None]
    k: tuple[torch.Tensor, torch.Tensor | None]
    v: tuple[torch.Tensor, torch.Tensor | None]
    o: tuple[torch.Tensor, torch.Tensor | None]
    scaling: float
    head_dim: int
    norm2: torch.Tensor
    eps2: float
    gate: tuple[torch.Tensor, torch.Tensor | None]
    up: tuple[torch.Tensor, torch.Tensor | None]
    down: tuple[torch.Tensor, torch.Tensor | None]
    act: nn.Module


def _hooked(module: nn.Module) -> bool:
    return any(
        m._forward_hooks or m._forward_pre_hooks or getattr(m, "_hf_hook", None) is not None
        for m in module.modules()
    )


def _linear(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    if type(module) is not nn.Linear:
        raise TypeError(f"{type(module).__name__} is not a plain nn.Linear")
    return module.weight, module.bias


def _rms_norm_parts(module: nn.Module) -> tuple[torch.Tensor, float]:
    if not type(module).__name__.endswith("RMSNorm") or not hasattr(module, "variance_epsilon"):
        raise TypeError(f"{type(module).__name__} is not an RMSNorm")
    return module.weight, float(module.variance_epsilon)


def lean_forward_for(model: nn.Module) -> LeanForward | None:
    """A LeanForward for `model`, or None (why is logged at debug level) when it is not one of
    the shapes it reproduces exactly."""
    if not switched_on(ENV_SWITCH):
        return None
    try:
        return LeanForward(model)
    except (TypeError, AttributeError) as e:
        log.debug("transformers' own forward for %s: %s", type(model).__name__, e)
        return None


class LeanForward:
    def __init__(self, model: nn.Module) -> None:
        if type(model).__name__ not in KNOWN_CAUSAL_LMS:
            raise TypeError(f"{type(model).__name__} is not one of {KNOWN_CAUSAL_LMS}")
        if _hooked(model):
            raise TypeError("the model has forward hooks (offloading, adapters)")
        base = model.model
        if len(base.layers) != base.config.num_hidden_layers:
            raise TypeError("the model runs a subset of its layers")
        self.embed = base.embed_tokens
        if type(self.embed) is not nn.Embedding:
            raise TypeError(f"{type(self.embed).__name__} is not a plain nn.Embedding")
        self.rotary = base.rotary_emb
        self.norm, self.norm_eps = _rms_norm_parts(base.norm)
        self.lm_head = _linear(model.lm_head)
        self.layers = []
        for layer in base.layers:
            if type(layer).__name__ not in KNOWN_LAYERS:
                raise TypeError(f"{type(layer).__name__} is not one of {KNOWN_LAYERS}")
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                _Layer(
                    getattr(attn, LAYER_ATTR),
                    *_rms_norm_parts(layer.input_layernorm),
                    _linear(attn.q_proj),
                    _linear(attn.k_proj),
                    _linear(attn.v_proj),
                    _linear(attn.o_proj),
                    float(attn.scaling),
                    int(attn.head_dim),
                    *_rms_norm_parts(layer.post_attention_layernorm),
                    _linear(mlp.gate_proj),
                    _linear(mlp.up_proj),
                    _linear(mlp.down_proj),
                    mlp.act_fn,
                )
            )

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor, step: StepMetadata
    ) -> torch.Tensor:
        """input_ids, positions [T]; keep [N] flat token indices -> logits [1, N, V], as the model's
        forward with `logits_to_keep=keep` gives them."""
        hidden = self.embed(input_ids[None])  # [1, T, hid]
        cos, sin = self.rotary(hidden, position_ids=positions[None])  # [1, T, D]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [1, 1, T, D]
        for p in self.layers:
            residual = hidden
            x = _rms_norm(hidden, p.norm1, p.eps1)
            shape = (*x.shape[:-1], -1, p.head_dim)  # [1, T, heads, D]
            q = F.linear(x, *p.q).view(shape).transpose(1, 2)  # [1, H, T, D]
            k = F.linear(x, *p.k).view(shape).transpose(1, 2)  # [1, Hkv, T, D]
            v = F.linear(x, *p.v).view(shape).transpose(1, 2)
            q = (q * cos) + (_rotate_half(q) * sin)
            k = (k * cos) + (_rotate_half(k) * sin)
            out = _attend_layer(step, p.pool_layer, q, k, v, p.scaling)  # [1, T, H, D]
            out = out.reshape(*x.shape[:-1], -1).contiguous()
            hidden = residual + F.linear(out, *p.o)
            residual = hidden
            x = _rms_norm(hidden, p.norm2, p.eps2)
            hidden = residual + F.linear(p.act(F.linear(x, *p.gate)) * F.linear(x, *p.up), *p.down)
        hidden = _rms_norm(hidden, self.norm, self.norm_eps)
        return F.linear(hidden[:, keep, :], *self.lm_head)  # [1, N, V]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
