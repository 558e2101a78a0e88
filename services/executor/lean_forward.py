"""A lean eager forward for Llama-shaped decoders (Llama, Mistral, Qwen2) on the model's own weights.

transformers' forward for these models is a tree of modules, each call wrapped in hooks, keyword
plumbing, output dataclasses and decorators; at decode batch sizes on CPU, with a small model, that
Python costs as much as a third of a step. `LeanForward` runs the same tensor operations, in the same
order, with the same shapes and strides (down to the [1, H, T, D] views transformers attends on), so
its logits are the same bit for bit as the modules' (tests/executor/test_lean_forward.py); only the
Python between them is gone. The attention is pagedserve's own (`attention._attend_layer`).

One exception, on by default: float32 linears on CPU run on weights packed once at load
(`kernels.packed_gemm`, 1.2-1.45x faster at decode batch sizes). Their sums may be split
differently from `F.linear`'s, so logits then differ from the modules' in the last bits (tested
to stay within 1e-5, and greedy tokens the same); PAGEDSERVE_PACKED_LINEARS=0 keeps `F.linear`.
Packed, q, k and v are one weight and gate and up another: three calls fewer per layer, each of
which costs a decode step as much Python and helper hand-off as the small matmul itself.

It takes a model only when every layer is one of the known classes with the expected parts and no
hooks; anything else (and `PAGEDSERVE_LEAN_FORWARD=0`) keeps transformers' forward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.common.switches import switched_on
from pagedserve.executor.attention import LAYER_ATTR, StepMetadata, _attend_layer
from pagedserve.kernels.cpu_native import rotary_in_place
from pagedserve.kernels.packed_gemm import PackedLinear, packed_linear

log = logging.getLogger(__name__)

ENV_SWITCH = "PAGEDSERVE_LEAN_FORWARD"
# Decoder layers whose forward is: x + attn(rms(x)), then x + mlp(rms(x)), rotary on q and k.
KNOWN_LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
KNOWN_CAUSAL_LMS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


Linear = Callable[[torch.Tensor], torch.Tensor]
LINEARS = tuple(f"self_attn.{x}_proj" for x in "qkvo") + tuple(
    f"mlp.{x}_proj" for x in ("gate", "up", "down")
)


class _Layer(NamedTuple):
    pool_layer: int
    norm1: torch.Tensor
    eps1: float
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    scaling: float
    head_dim: int
    norm2: torch.Tensor
    eps2: float
    gate: Linear
    up: Linear
    down: Linear
    act: nn.Module
    qkv: PackedLinear | None  # q, k and v in one packed weight (None: the three above)
    gate_up: PackedLinear | None  # gate and up in one packed weight
    q_width: int
    kv_width: int
    ffn_width: int


def _hooked(module: nn.Module) -> bool:
    return any(
        m._forward_hooks or m._forward_pre_hooks or getattr(m, "_hf_hook", None) is not None
        for m in module.modules()
    )


def _linear(module: nn.Module, pack: bool) -> Linear:
    """The module's x -> x @ W.T + b: on its packed weight where `pack` and the weight allows,
    else `F.linear` on its own tensors."""
    if type(module) is not nn.Linear:
        raise TypeError(f"{type(module).__name__} is not a plain nn.Linear")
    weight, bias = module.weight, module.bias
    packed = packed_linear(weight, bias) if pack else None
    if packed is not None:
        return packed
    return lambda x: F.linear(x, weight, bias)


def _fused(modules: tuple[nn.Module, ...], pack: bool) -> PackedLinear | None:
    """One packed linear for modules that read the same input, their outputs side by side; None
    where they do not pack (then each runs on its own). Packed, each module's weight becomes its
    rows of the joined weight (the same values), so the join costs no second copy of them."""
    biases = [m.bias for m in modules]
    if not pack or (any(b is None for b in biases) and any(b is not None for b in biases)):
        return None
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
    weight = torch.cat([m.weight.detach() for m in modules])
    fused = packed_linear(weight, bias)
    if fused is not None:
        start = 0
        for m in modules:
            rows = m.weight.shape[0]
            m.weight.data = weight[start : start + rows]
            start += rows
    return fused


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
    def __init__(self, model: nn.Module, pack: bool = True) -> None:
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
        for layer in base.layers:
            if type(layer).__name__ not in KNOWN_LAYERS:
                raise TypeError(f"{type(layer).__name__} is not one of {KNOWN_LAYERS}")
            for name in LINEARS:
                module = layer.get_submodule(name)
                if type(module) is not nn.Linear:
                    raise TypeError(f"{name} is a {type(module).__name__}, not a plain nn.Linear")
        # Every linear is plain: only now pack (a copy of every weight), or nothing at all.
        self.lm_head = _linear(model.lm_head, pack)
        self.layers = []
        for layer in base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            # q, k and v (gate and up) read the same input: one packed weight each, where they
            # pack; the separate linears then stay unpacked, for the fallback only.
            qkv = _fused((attn.q_proj, attn.k_proj, attn.v_proj), pack)
            gate_up = _fused((mlp.gate_proj, mlp.up_proj), pack)
            self.layers.append(
                _Layer(
                    getattr(attn, LAYER_ATTR),
                    *_rms_norm_parts(layer.input_layernorm),
                    *(_linear(m, pack and qkv is None) for m in (attn.q_proj, attn.k_proj, attn.v_proj)),
                    _linear(attn.o_proj, pack),
                    float(attn.scaling),
                    int(attn.head_dim),
                    *_rms_norm_parts(layer.post_attention_layernorm),
                    *(_linear(m, pack and gate_up is None) for m in (mlp.gate_proj, mlp.up_proj)),
                    _linear(mlp.down_proj, pack),
                    mlp.act_fn,
                    qkv,
                    gate_up,
                    attn.q_proj.out_features,
                    attn.k_proj.out_features,
                    mlp.gate_proj.out_features,
                )
            )

    def describe(self) -> str:
        """For the start-up log: whether the linears run on packed weights, and what that costs."""
        linears = [
            self.lm_head,
            *(f for p in self.layers for f in (p.q, p.k, p.v, p.o, p.gate, p.up, p.down, p.qkv, p.gate_up)),
        ]
        packed = [f for f in linears if isinstance(f, PackedLinear)]
        if not packed:
            return "lean forward"
        mib = sum(f.out_features * f.in_features * 4 for f in packed) / 2**20
        sliced = sum(len(f.slices) > 1 for f in packed)
        onednn = (
            sum(f.out_features * f.in_features * 4 for f in packed if f.onednn_weight is not None) / 2**20
        )
        return (
            f"lean forward, {len(packed)} linears on packed weights (about {mib:.0f} MiB beside the model's"
            + (f"; {sliced} in column slices for the core helpers" if sliced else "")
            + (f"; {onednn:.0f} MiB more in oneDNN's layout for steps on several threads" if onednn else "")
            + ")"
        )

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor, step: StepMetadata
    ) -> torch.Tensor:
        """input_ids, positions [T]; keep [N] flat token indices -> logits [1, N, V], as the model's
        forward with `logits_to_keep=keep` gives them."""
        hidden = self.embed(input_ids[None])  # [1, T, hid]
        cos, sin = self.rotary(hidden, position_ids=positions[None])  # [1, T, D]
        flat_cos, flat_sin = cos[0], sin[0]  # [T, D], for the native rotary
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [1, 1, T, D]
        for p in self.layers:
            residual = hidden
            x = _rms_norm(hidden, p.norm1, p.eps1)
            shape = (*x.shape[:-1], -1, p.head_dim)  # [1, T, heads, D]
            if p.qkv is not None:
                qkv = p.qkv(x)
                nq = p.q_width
                q, k, v = qkv[..., :nq], qkv[..., nq : nq + p.kv_width], qkv[..., nq + p.kv_width :]
            else:
                q, k, v = p.q(x), p.k(x), p.v(x)  # [1, T, heads * D]
            # in place, the same bits as the tensor ops below, in one pass (cpu_native)
            q_done = rotary_in_place(q.view(shape)[0], flat_cos, flat_sin)
            k_done = rotary_in_place(k.view(shape)[0], flat_cos, flat_sin)
            q = q.view(shape).transpose(1, 2)  # [1, H, T, D]
            k = k.view(shape).transpose(1, 2)  # [1, Hkv, T, D]
            v = v.view(shape).transpose(1, 2)
            if not q_done:
                q = (q * cos) + (_rotate_half(q) * sin)
            if not k_done:
                k = (k * cos) + (_rotate_half(k) * sin)
            out = _attend_layer(step, p.pool_layer, q, k, v, p.scaling)  # [1, T, H, D]
            out = out.reshape(*x.shape[:-1], -1).contiguous()
            hidden = residual + p.o(out)
            residual = hidden
            x = _rms_norm(hidden, p.norm2, p.eps2)
            if p.gate_up is not None:
                gate_up = p.gate_up(x)
                gate, up = gate_up[..., : p.ffn_width], gate_up[..., p.ffn_width :]
            else:
                gate, up = p.gate(x), p.up(x)
            hidden = residual + p.down(p.act(gate) * up)
        hidden = _rms_norm(hidden, self.norm, self.norm_eps)
        return self.lm_head(hidden[:, keep, :])  # [1, N, V]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
