"""Building blocks for the executor tests: tiny random models, a reference greedy run with
`generate`, and `StepDriver`, a toy scheduler that feeds an engine steps the way the real one does.

Imported by the test modules (pytest puts this folder on sys.path) and by the Triton case, which
runs in a subprocess under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hf_reference import reference_greedy  # noqa: F401  (re-exported to the tests)
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
)

from pagedserve.common.params import SamplingParams
from pagedserve.common.step import CachedRequestData, NewRequestData, StepInput
from pagedserve.executor.engine import ExecutorEngine

VOCAB = 512
GREEDY = SamplingParams(temperature=0.0, max_tokens=64)
# Eight prompts that cross several 8-token block boundaries (and one 16-token one) once decoding.
PROMPT_LENGTHS = (1, 5, 8, 9, 16, 23, 33, 50)


def tiny_config(family: str) -> PretrainedConfig:
    """A 2-layer, hidden-64 config of `family`, each exercising something different."""
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1)
    if family == "llama":  # GQA 2:1
        return LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, **common,
        )  # fmt: skip
    if family == "qwen2":  # q/k/v biases, GQA 4:1, tied embeddings
        return Qwen2Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True, **common,
        )  # fmt: skip
    if family == "mistral":  # head_dim != hidden / heads, GQA 4:1, a sliding window longer than any test
        return MistralConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=128, **common,
        )  # fmt: skip
    if family == "gpt2":  # absolute positions, MHA, per-layer attention scaling
        return GPT2Config(
            n_embd=64, n_layer=2, n_head=4, n_positions=256, scale_attn_by_inverse_layer_idx=True, **common,
        )  # fmt: skip
    raise ValueError(family)


def save_tiny_model(family: str, path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    model.save_pretrained(path)
    return path


def make_prompts(lengths: tuple[int, ...], vocab_size: int, seed: int = 0, low: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(low, vocab_size) for _ in range(n)] for n in lengths]


def chunk_sizes(length: int, num_chunks: int) -> list[int]:
    """`length` split into up to `num_chunks` nearly equal positive parts."""
    n = min(num_chunks, length)
    return [length // n + (i < length % n) for i in range(n)]


@dataclass
class _Seq:
    request_id: str
    prompt: list[int]
    arrival: int
    chunks: list[int]
    outputs: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0
    sent: bool = False

    @property
    def num_known(self) -> int:
        return len(self.prompt) + len(self.outputs)


class StepDriver:
    """A toy scheduler: shuffled free blocks, chunked prefill, decode, finish; checks the
    sampling rule on every reply."""

    def __init__(self, engine: ExecutorEngine, seed: int = 0) -> None:
        self.engine = engine
        self.rng = random.Random(seed)
        self.free = list(range(engine.pool.num_blocks))
        self.rng.shuffle(self.free)
        self.step_id = 0

    def _take_blocks(self, seq: _Seq, num_tokens: int) -> list[int]:
        needed = -(-num_tokens // self.engine.pool.block_size) - len(seq.blocks)
        new = [self.free.pop() for _ in range(max(needed, 0))]
        seq.blocks.extend(new)
        return new

    def step(self, seqs: list[_Seq], finished: list[str]) -> dict[str, int]:
        """One step for `seqs` (each gets its next chunk or one decode token); returns the samples."""
        new, cached, scheduled = [], [], {}
        for seq in seqs:
            n = seq.chunks.pop(0) if seq.chunks else 1
            new_blocks = self._take_blocks(seq, seq.num_computed + n)
            if not seq.sent:
                new.append(
                    NewRequestData(
                        seq.request_id, seq.prompt, [], GREEDY, list(seq.blocks), seq.num_computed, n
                    )
                )
                seq.sent = True
            else:
                cached.append(CachedRequestData(seq.request_id, new_blocks, n, seq.num_computed))
            scheduled[seq.request_id] = (seq, n)
        step = StepInput(self.step_id, self.engine.epoch, new, cached, finished)
        self.step_id += 1
        out = self.engine.execute_step(step, step.total_num_scheduled_tokens)
        assert out.epoch == self.engine.epoch
        sampled = {s.request_id: s.token_id for s in out.sampled}
        assert len(sampled) == len(out.sampled), "one token per sequence"
        for request_id, (seq, n) in scheduled.items():
            seq.num_computed += n
            reached_end = seq.num_computed == seq.num_known
            assert (request_id in sampled) == reached_end, f"{request_id}: sampling rule broken"
            if reached_end:
                seq.outputs.append(sampled[request_id])
        return sampled

    def run(
        self, prompts: list[list[int]], max_new_tokens: int, num_chunks: int = 1, stagger: int = 1
    ) -> list[list[int]]:
        """Greedy-generates `max_new_tokens` per prompt; prompt i arrives at step i % stagger and its
        prefill is split into `num_chunks` steps. Frees every request at the end."""
        seqs = [
            _Seq(f"req-{i}", p, i % stagger, chunk_sizes(len(p), num_chunks)) for i, p in enumerate(prompts)
        ]
        finished: list[str] = []
        t = 0
        while any(len(s.outputs) < max_new_tokens for s in seqs):
            active = [s for s in seqs if s.arrival <= t and len(s.outputs) < max_new_tokens]
            self.step(active, finished)
            finished = []
            for s in active:
                if len(s.outputs) == max_new_tokens:
                    finished.append(s.request_id)
                    self.free.extend(s.blocks)
                    self.rng.shuffle(self.free)
            t += 1
        self.engine.execute_step(StepInput(self.step_id, self.engine.epoch, forget_request_ids=finished))
        self.step_id += 1
        assert not self.engine.requests, "every finished request is dropped"
        return [s.outputs for s in seqs]
