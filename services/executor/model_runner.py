"""Runs a Hugging Face causal LM over the paged KV pool, one flat batch per step.

pagedserve's attention is registered with transformers' `AttentionInterface` under the name
"pagedserve" (and a mask function returning None, since the kernels mask by themselves). Every
scheduled token of every sequence goes into one flat batch `[1, T]` with explicit positions; the step's
`StepMetadata` rides along as an extra keyword argument that transformers hands to each layer's
attention function, which writes the new K/V into the pool (`reshape_and_cache`) and attends over the
pool through the block tables (`paged_attention`). Logits are computed only at the sampled tokens
(`logits_to_keep` = their flat indices).

At load a probe forward checks that the architecture really routes attention through the interface
(every attention module called once, one KV layout for all layers) and assigns each attention module
its pool layer in call order, so models whose modules lack `layer_idx` work too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.executor.kv_pool import KVCacheSpec, KVPool, cdiv
from pagedserve.kernels.backends import AttentionBackend, get_attention_backend

log = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "pagedserve"
STEP_KWARG = "pagedserve_step"  # the keyword that carries StepMetadata to the attention function
LAYER_ATTR = "_pagedserve_layer"  # pool layer of an attention module, set by the probe
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Keyword arguments some architectures pass to the attention function that our kernels do not
# implement; a non-None value means the model needs them (logit soft-capping, attention sinks).
UNSUPPORTED_ATTENTION_KWARGS = ("softcap", "s_aux", "sinks")


class UnsupportedModel(ValueError):
    """The model cannot run on pagedserve's attention; the message says why."""


class ScheduledSeq(NamedTuple):
    """One sequence's share of a step, as the engine hands it to `prepare_inputs`."""

    token_ids: list[int]  # every known token (prompt + outputs); the step reads [start, start + num_tokens)
    block_ids: list[int]  # the block table, covering at least start + num_tokens slots
    start: int  # num_computed_tokens before the step
    num_tokens: int  # num_scheduled_tokens
    sample: bool  # whether a token is sampled after the last scheduled one


@dataclass(slots=True)
class StepMetadata:
    """What every layer's attention needs for one forward; one object shared by all layers."""

    slot_mapping: torch.Tensor  # [T] int64, pool slot each new token's K/V goes to
    block_table: torch.Tensor  # [S, max_blocks] int32
    seq_lens: torch.Tensor  # [S] int32, context length including the new tokens
    cu_seqlens_q: torch.Tensor  # [S + 1] int32
    k_caches: list[torch.Tensor]  # per layer [num_blocks, block_size, Hkv, D]
    v_caches: list[torch.Tensor]
    backend: AttentionBackend


class StepInputs(NamedTuple):
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    block_table: torch.Tensor  # [S, max_blocks] int32
    seq_lens: torch.Tensor  # [S] int32
    cu_seqlens_q: torch.Tensor  # [S + 1] int32
    sample_indices: torch.Tensor  # [N] int64, flat token index of each sampled sequence's last token


def prepare_inputs(seqs: list[ScheduledSeq], block_size: int, device: torch.device) -> StepInputs:
    """Packs the scheduled tokens of all sequences back to back, in order."""
    input_ids: list[int] = []
    q_lens: list[int] = []
    starts: list[int] = []
    sample_indices: list[int] = []
    max_blocks = 1
    for seq in seqs:
        end = seq.start + seq.num_tokens
        input_ids.extend(seq.token_ids[seq.start : end])
        q_lens.append(seq.num_tokens)
        starts.append(seq.start)
        if seq.sample:
            sample_indices.append(len(input_ids) - 1)
        max_blocks = max(max_blocks, cdiv(end, block_size))
    # Only the blocks a sequence's context covers go in; the rest of each row is padding (never read).
    block_table = torch.zeros((len(seqs), max_blocks), dtype=torch.int32)  # [S, max_blocks]
    for row, seq in enumerate(seqs):
        used = seq.block_ids[: cdiv(seq.start + seq.num_tokens, block_size)]
        block_table[row, : len(used)] = torch.tensor(used, dtype=torch.int32)

    q_lens_t = torch.tensor(q_lens, dtype=torch.int64)  # [S]
    cu_seqlens_q = torch.zeros(len(seqs) + 1, dtype=torch.int64)  # [S + 1]
    torch.cumsum(q_lens_t, 0, out=cu_seqlens_q[1:])
    num_tokens = len(input_ids)
    seq_of_token = torch.repeat_interleave(torch.arange(len(seqs)), q_lens_t)  # [T]
    local = torch.arange(num_tokens) - cu_seqlens_q[seq_of_token]  # [T]
    positions = torch.tensor(starts, dtype=torch.int64)[seq_of_token] + local  # [T]
    slot_mapping = (
        block_table[seq_of_token, positions // block_size].long() * block_size + positions % block_size
    )  # [T]
    seq_lens = torch.tensor(starts, dtype=torch.int64) + q_lens_t  # [S]

    def to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return t.to(device=device, dtype=dtype, non_blocking=True)

    return StepInputs(
        input_ids=to(torch.tensor(input_ids, dtype=torch.int64), torch.int64),
        positions=to(positions, torch.int64),
        slot_mapping=to(slot_mapping, torch.int64),
        block_table=to(block_table, torch.int32),
        seq_lens=to(seq_lens, torch.int32),
        cu_seqlens_q=to(cu_seqlens_q, torch.int32),
        sample_indices=to(torch.tensor(sample_indices, dtype=torch.int64), torch.int64),
    )


@dataclass(slots=True)
class _Probe:
    """Passed instead of StepMetadata during the load-time probe: records each attention call."""

    modules: list[nn.Module] = field(default_factory=list)
    layouts: list[tuple[int, int, int, torch.dtype]] = field(default_factory=list)  # (H, Hkv, D, dtype)
    sliding_windows: list[int | None] = field(default_factory=list)
    unsupported: set[str] = field(default_factory=set)


def _probe_attention(probe: _Probe, module, query, key, value, scaling, kwargs) -> torch.Tensor:
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
    if isinstance(step, _Probe):
        return _probe_attention(step, module, query, key, value, scaling, kwargs), None
    if step is None:
        raise RuntimeError(
            f"the '{ATTN_IMPLEMENTATION}' attention was called without step metadata; "
            f"call the model through ModelRunner, which passes {STEP_KWARG}=..."
        )
    layer = getattr(module, LAYER_ATTR)
    k_cache, v_cache = step.k_caches[layer], step.v_caches[layer]
    q = query[0].transpose(0, 1)  # [T, H, D]
    step.backend.reshape_and_cache(
        key[0].transpose(0, 1), value[0].transpose(0, 1), k_cache, v_cache, step.slot_mapping
    )
    out = q.new_empty(q.shape)  # [T, H, D]
    step.backend.paged_attention(
        q, k_cache, v_cache, step.block_table, step.seq_lens, step.cu_seqlens_q, scaling, out=out
    )
    return out.unsqueeze(0), None  # [1, T, H, D]


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


def resolve_dtype(name: str, device: torch.device, model_dtype: torch.dtype | str | None) -> torch.dtype:
    """`auto`: the checkpoint's dtype on CUDA (float32 when it names none), float32 elsewhere."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose auto or one of {list(DTYPES)}")
        return DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    if isinstance(model_dtype, str):
        model_dtype = DTYPES.get(model_dtype.removeprefix("torch."))
    return model_dtype if model_dtype in DTYPES.values() else torch.float32


class ModelRunner:
    """Owns the model; turns a list of `ScheduledSeq` into logits at the sampled tokens."""

    def __init__(self, model: nn.Module, backend: AttentionBackend, device: torch.device, name: str) -> None:
        self.model = model
        self.backend = backend
        self.device = device
        self.name = name
        config = model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.architecture = type(model).__name__
        self.dtype = next(model.parameters()).dtype
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_position_embeddings: int | None = getattr(text_config, "max_position_embeddings", None)
        eos = getattr(model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = getattr(config, "eos_token_id", None)
        if eos is None:
            eos = []
        self.eos_token_ids: tuple[int, ...] = tuple(
            int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])
        )
        self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim, self.sliding_window = self._probe()

    @classmethod
    def load(
        cls,
        model: str,
        *,
        dtype: str = "auto",
        device: str | torch.device = "cpu",
        attention_backend: str | None = None,
    ) -> ModelRunner:
        """Loads any HF causal LM (local path or hub id) and switches it to pagedserve's attention."""
        from transformers import AutoConfig, AutoModelForCausalLM

        device = torch.device(device)
        backend = get_attention_backend(attention_backend, device)
        config = AutoConfig.from_pretrained(model)
        torch_dtype = resolve_dtype(dtype, device, getattr(config, "dtype", None))
        hf_model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype)
        return cls.from_model(hf_model.to(device), backend, name=model)

    @classmethod
    def from_model(cls, model: nn.Module, backend: AttentionBackend, name: str = "") -> ModelRunner:
        """Wraps an already-loaded model (used by `load`, and by tests with in-memory models)."""
        register_attention()
        model.eval()
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            raise UnsupportedModel(
                f"{type(model).__name__} does not let transformers set its attention implementation "
                "(it does not route attention through AttentionInterface), so pagedserve cannot run it"
            )
        device = next(model.parameters()).device
        return cls(model, backend, device, name or type(model).__name__)

    @torch.inference_mode()
    def _probe(self) -> tuple[int, int, int, int, int | None]:
        """One short forward recording every attention call; returns
        (num_layers, num_heads, num_kv_heads, head_dim, sliding_window or None)."""
        probe = _Probe()
        ids = torch.zeros((1, 4), dtype=torch.int64, device=self.device)  # [1, 4]
        positions = torch.arange(4, device=self.device)[None]  # [1, 4]
        self.model(
            input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=1, **{STEP_KWARG: probe}
        )
        if not probe.modules:
            raise UnsupportedModel(
                f"{self.architecture}: the model never called the registered attention function; its "
                "attention does not route through transformers' AttentionInterface, so pagedserve cannot run it"
            )
        if len({id(m) for m in probe.modules}) != len(probe.modules):
            raise UnsupportedModel(
                f"{self.architecture}: an attention module ran more than once in one forward "
                "(shared layers); one KV pool layer per call is not supported"
            )
        if len(set(probe.layouts)) != 1:
            raise UnsupportedModel(
                f"{self.architecture}: attention layers differ in (heads, kv heads, head_dim, dtype): "
                f"{sorted(set(probe.layouts), key=str)}; the pool needs one layout for every layer"
            )
        if probe.unsupported:
            raise UnsupportedModel(
                f"{self.architecture}: its attention needs {sorted(probe.unsupported)}, "
                "which pagedserve's kernels do not implement"
            )
        for layer, module in enumerate(probe.modules):
            setattr(module, LAYER_ATTR, layer)
        num_heads, num_kv_heads, head_dim, _ = probe.layouts[0]
        windows = [w for w in probe.sliding_windows if w is not None]
        return len(probe.modules), num_heads, num_kv_heads, head_dim, min(windows) if windows else None

    def kv_cache_spec(self, block_size: int) -> KVCacheSpec:
        return KVCacheSpec(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype, block_size)

    @torch.inference_mode()
    def execute(self, seqs: list[ScheduledSeq], pool: KVPool) -> torch.Tensor:
        """Runs one forward over `seqs`; returns float32 logits [N, V], one row per sampled sequence
        in the order of `seqs`."""
        inputs = prepare_inputs(seqs, pool.block_size, self.device)
        return self.forward(inputs, pool)

    @torch.inference_mode()
    def forward(self, inputs: StepInputs, pool: KVPool) -> torch.Tensor:
        step = StepMetadata(
            slot_mapping=inputs.slot_mapping,
            block_table=inputs.block_table,
            seq_lens=inputs.seq_lens,
            cu_seqlens_q=inputs.cu_seqlens_q,
            k_caches=pool.k_caches,
            v_caches=pool.v_caches,
            backend=self.backend,
        )
        out = self.model(
            input_ids=inputs.input_ids[None],  # [1, T]
            position_ids=inputs.positions[None],  # [1, T]
            use_cache=False,
            logits_to_keep=inputs.sample_indices,  # [N]
            **{STEP_KWARG: step},
        )
        return out.logits[0].float()  # [N, V]

    @torch.inference_mode()
    def profile_peak_memory(self, max_num_batched_tokens: int, max_model_len: int, block_size: int) -> int:
        """CUDA only: bytes the weights plus a forward of max_num_batched_tokens tokens (packed into
        sequences of up to max_model_len, in a throw-away pool) take at peak, non-torch memory included."""
        assert self.device.type == "cuda", "profiling measures CUDA memory"
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        seq_len = min(max_model_len, max_num_batched_tokens)
        lengths = [seq_len] * (max_num_batched_tokens // seq_len)
        if max_num_batched_tokens % seq_len:
            lengths.append(max_num_batched_tokens % seq_len)
        blocks_per_seq = cdiv(seq_len, block_size)
        pool = KVPool(self.kv_cache_spec(block_size), blocks_per_seq * len(lengths), self.device)
        seqs = [
            ScheduledSeq([0] * n, list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)), 0, n, True)
            for i, n in enumerate(lengths)
        ]
        inputs = prepare_inputs(seqs, block_size, self.device)
        # Logits for up to 256 rows, as a large decode batch would sample.
        num_sampled = min(max_num_batched_tokens, 256)
        inputs = inputs._replace(sample_indices=torch.arange(num_sampled, device=self.device))
        self.forward(inputs, pool)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - pool.num_bytes
        free, total = torch.cuda.mem_get_info(self.device)
        non_torch = total - free - torch.cuda.memory_reserved(self.device)
        del pool, inputs
        torch.cuda.empty_cache()
        return peak + max(non_torch, 0)

    @torch.inference_mode()
    def self_check(self, block_size: int) -> None:
        """Compares paged logits (a chunked prefill, then two decode steps, in a throw-away pool
        with a reversed block table) with the model's own dense forward; raises UnsupportedModel
        when they differ, e.g. for a model with state outside the KV cache."""
        prompt = [(7 * i + 3) % self.vocab_size for i in range(block_size + 3)]
        num_blocks = cdiv(len(prompt), block_size) + 1
        pool = KVPool(self.kv_cache_spec(block_size), num_blocks, self.device)
        blocks = list(reversed(range(num_blocks)))
        chunks = [(0, len(prompt) - 2), (len(prompt) - 2, 1), (len(prompt) - 1, 1)]
        paged = torch.cat(
            [self.execute([ScheduledSeq(prompt, blocks, start, n, True)], pool) for start, n in chunks]
        )  # [3, V]
        ids = torch.tensor([prompt], device=self.device)  # [1, P]
        with _dense_attention(self.model):
            dense = self.model(input_ids=ids, use_cache=False).logits[0, -3:].float()  # [3, V]
        err = (paged - dense).abs().max().item()
        # Relative to the logits' scale; half precision differs between attention implementations.
        rtol = 1e-4 if self.dtype == torch.float32 else 3e-2
        atol = rtol * max(1.0, dense.abs().max().item())
        if not err <= atol:
            raise UnsupportedModel(
                f"{self.architecture}: paged attention logits differ from the model's own forward by {err:.3g} "
                f"(tolerance {atol:.3g}); this architecture does not work with pagedserve's attention"
            )
        log.info("self-check passed: paged vs dense logits max abs difference %.3g", err)


class _dense_attention:
    """Context manager: the model's stock attention ("sdpa", else "eager") for a reference forward."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        try:
            self.model.set_attn_implementation("sdpa")
        except (ValueError, ImportError):
            self.model.set_attn_implementation("eager")

    def __exit__(self, *exc: object) -> None:
        self.model.set_attn_implementation(ATTN_IMPLEMENTATION)
