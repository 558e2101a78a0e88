"""Runs a Hugging Face causal LM over the paged KV pool, one flat batch per step.

pagedserve's attention is registered with transformers' `AttentionInterface` under the name
"pagedserve" (and a mask function returning None, since the kernels mask by themselves). Every
scheduled token of every sequence goes into one flat batch `[1, T]` with explicit positions; the step's
`StepMetadata` rides along as an extra keyword argument that transformers hands to each layer's
attention function, which writes the new K/V into the pool (`reshape_and_cache`) and attends over the
pool through the block tables (`paged_attention`). Logits are computed only at the sampled tokens
(`logits_to_keep` = their flat indices), and at the prompt positions of requests that ask for
prompt logprobs (see `prompt_logprobs`).

With `compile` (the executor's `--compile`), forwards run through torch.compile instead: the
model gets a constant marker as its step keyword, and each layer's attention is one custom op that
reads the real step from it (see `attention.paged_attention_op`).

At load a probe forward checks that the architecture really routes attention through the interface
(every attention module called once, one KV layout for all layers) and assigns each attention module
its pool layer in call order, so models whose modules lack `layer_idx` work too.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from pagedserve.common.sizes import cdiv
from pagedserve.executor.attention import (
    ATTN_IMPLEMENTATION,
    COMPILED_STEP,
    LAYER_ATTR,
    STEP_KWARG,
    AttentionProbe,
    MissingStepMetadata,
    StepMetadata,
    register_attention,
)
from pagedserve.executor.cuda_graphs import DecodeGraphs
from pagedserve.executor.inputs import ScheduledSeq, StepInputs, prepare_inputs
from pagedserve.executor.kv_pool import KVCacheSpec, KVPool
from pagedserve.executor.lean_forward import LeanForward, lean_forward_for
from pagedserve.kernels.backends import AttentionBackend, get_attention_backend

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class UnsupportedModel(ValueError):
    """The model cannot run on pagedserve's attention; the message says why."""


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
        # The same operations without transformers' per-module Python, for the architectures it
        # reproduces (see lean_forward); after the probe, which numbers the layers.
        self.lean: LeanForward | None = lean_forward_for(model)
        self.compiled: nn.Module | None = None  # the torch.compile'd model, once `compile` ran
        self.decode_graphs: DecodeGraphs | None = None  # CUDA graphs of decode steps, once captured

    def compile(self, block_size: int) -> float:
        """Runs later forwards through torch.compile (inductor), whole graph, dynamic token count; the
        paged attention is one custom op per layer (`pagedserve::paged_attention`). Compiles now, by
        forwards in a throw-away pool for each shape class torch.compile specializes (size 1: T > 1
        with one and with several sampled rows; T = 1), so no step waits for a compile; returns the
        seconds it took. Steps that sample no row stay eager (see `forward`)."""
        start = time.perf_counter()
        self.compiled = torch.compile(self.model, dynamic=True, fullgraph=True)
        prompt = [(5 * i + 1) % self.vocab_size for i in range(block_size + 3)]
        blocks_per_seq = cdiv(len(prompt) + 1, block_size)
        pool = KVPool(self.kv_cache_spec(block_size), 2 * blocks_per_seq, self.device)
        tables = [list(range(blocks_per_seq)), list(range(blocks_per_seq, 2 * blocks_per_seq))]
        n = len(prompt)
        self.execute([ScheduledSeq(prompt, tables[0], 0, n, True)], pool)  # prefill: T > 1, one row
        self.execute([ScheduledSeq(prompt, tables[1], 0, n - 1, False)], pool)  # no row: runs eager
        self.execute([ScheduledSeq(prompt, tables[0], n - 1, 1, True)], pool)  # decode: T = 1
        both = [ScheduledSeq(prompt, t, n - 1, 1, True) for t in tables]
        self.execute(both, pool)  # a decode batch: T > 1, several rows
        return time.perf_counter() - start

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
        probe = AttentionProbe()
        ids = torch.zeros((1, 4), dtype=torch.int64, device=self.device)  # [1, 4]
        positions = torch.arange(4, device=self.device)[None]  # [1, 4]
        try:
            self.model(
                input_ids=ids,
                position_ids=positions,
                use_cache=False,
                logits_to_keep=1,
                **{STEP_KWARG: probe},
            )
        except MissingStepMetadata as e:
            raise UnsupportedModel(
                f"{self.architecture}: its attention layers do not pass the forward's keyword arguments "
                "through to the attention function, so the step's metadata never reaches it"
            ) from e
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
    def execute(
        self, seqs: list[ScheduledSeq], pool: KVPool, extra_rows: list[int] | None = None
    ) -> torch.Tensor:
        """Runs one forward over `seqs`; returns float32 logits [N, V], one row per sampled sequence
        in the order of `seqs`, then (with `extra_rows`, flat token indices) one row per extra
        index: [N + E, V] (prompt logprobs keep logits at prompt positions this way)."""
        graphs = self.decode_graphs
        if not extra_rows and graphs is not None and pool is graphs.pool:
            logits = graphs.run(seqs)
            if logits is not None:
                return logits
        inputs = prepare_inputs(seqs, pool.block_size, self.device)
        if extra_rows:
            extra = torch.tensor(extra_rows, dtype=torch.int64, device=self.device)  # [E]
            inputs = inputs._replace(sample_indices=torch.cat([inputs.sample_indices, extra]))
        return self.forward(inputs, pool)

    @torch.inference_mode()
    def forward(self, inputs: StepInputs, pool: KVPool) -> torch.Tensor:
        # Made once per step, shared by every layer (the torch backend plans its gathers here).
        paged = self.backend.prepare_step(
            inputs.slot_mapping, inputs.block_table, inputs.seq_lens, inputs.cu_seqlens_q, pool.block_size
        )
        step = StepMetadata(paged=paged, k_caches=pool.k_caches, v_caches=pool.v_caches)
        # A step that samples nothing (prefill chunks only) runs eager: with no logits row to keep,
        # the compiled graph's output does not depend on the layers, and inductor would drop them,
        # KV writes included (the custom op's pool write is a side effect the graph does not see).
        if self.lean is not None and (self.compiled is None or inputs.sample_indices.numel() == 0):
            logits = self.lean(inputs.input_ids, inputs.positions, inputs.sample_indices, step)
            return logits[0].float()  # [N, V]
        if self.compiled is None or inputs.sample_indices.numel() == 0:
            out = self.model(
                input_ids=inputs.input_ids[None],  # [1, T]
                position_ids=inputs.positions[None],  # [1, T]
                use_cache=False,
                logits_to_keep=inputs.sample_indices,  # [N]
                **{STEP_KWARG: step},
            )
        else:
            with COMPILED_STEP.running(step):
                out = self.compiled(
                    input_ids=inputs.input_ids[None],  # [1, T]
                    position_ids=inputs.positions[None],  # [1, T]
                    use_cache=False,
                    logits_to_keep=inputs.sample_indices,  # [N]
                    **{STEP_KWARG: COMPILED_STEP},
                )
        return out.logits[0].float()  # [N, V]

    @torch.inference_mode()
    def largest_step(
        self, max_num_batched_tokens: int, max_model_len: int, block_size: int
    ) -> tuple[KVPool, list[ScheduledSeq]]:
        """The heaviest step the limits allow: max_num_batched_tokens prompt tokens in sequences of
        up to max_model_len, each sampling once, in a throw-away pool of their own."""
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
        return pool, seqs

    def profile_peak_memory(self, max_num_batched_tokens: int, max_model_len: int, block_size: int) -> int:
        """CUDA only: bytes the weights plus a forward of the largest step (`largest_step`) take at
        peak, non-torch memory included."""
        assert self.device.type == "cuda", "profiling measures CUDA memory"
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        pool, seqs = self.largest_step(max_num_batched_tokens, max_model_len, block_size)
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
