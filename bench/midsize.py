"""Random-weight Llamas for benchmark rows where the forward pass, not the serving overhead, dominates.

The mid-size model: 8 layers, hidden 512, 16 heads of 32 (8 KV heads, the bundled model's GQA
ratio), MLP 1376, tied embeddings, the bundled model's tokenizer and vocabulary (4096): 25.3 M
parameters, float32, seed 0. Built once and saved under the bench cache (never committed); no
download is needed.

The 1B-class model of the GPU figures (`--llama-1b`, bench/gpu_device_check.sh): TinyLlama's
shape, 22 layers, hidden 2048, 32 heads of 64 with 4 KV heads, MLP 5632, vocabulary 32,000,
untied: 1.10 B parameters, bfloat16, no tokenizer (the executor bench needs none).

    python -m pagedserve.bench.midsize [--llama-1b] [DIR]
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from pagedserve.common.models import default_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def midsize_config(vocab_size: int, *, bos: int = 0, eos: int = 1, pad: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
        num_attention_heads=16, num_key_value_heads=8, head_dim=32, max_position_embeddings=2048,
        rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
        dtype="float32",
    )  # fmt: skip


def parameter_count(config) -> int:
    """Parameters of a LlamaForCausalLM with `config`, without building it."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    d = config.head_dim
    attn = h * config.num_attention_heads * d * 2 + h * config.num_key_value_heads * d * 2  # q, o; k, v
    layer = attn + 3 * h * i + 2 * h  # + gate, up, down; two RMSNorms
    head = 0 if config.tie_word_embeddings else v * h
    return v * h + config.num_hidden_layers * layer + h + head


def default_midsize_dir() -> Path:
    from pagedserve.bench.vllm_peer import default_cache_dir

    return default_cache_dir() / "models" / "llama-25m-random"


def build_midsize(
    out_dir: str | Path | None = None, tokenizer_dir: str | Path | None = None, seed: int = 0
) -> Path:
    """Save the model (safetensors) and the bundled tokenizer in `out_dir`; reuse it if there."""
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    out = Path(out_dir) if out_dir else default_midsize_dir()
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    src = Path(tokenizer_dir or default_model())
    vocab = Tokenizer.from_file(str(src / "tokenizer.json")).get_vocab_size()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(midsize_config(vocab)).to(torch.float32).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return out


def llama_1b_config(num_layers: int = 22):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=num_layers,
        num_attention_heads=32, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, dtype="bfloat16",
    )  # fmt: skip


def build_llama_1b(out_dir: str | Path, seed: int = 0, num_layers: int = 22) -> Path:
    """Save a random-weight `llama_1b_config()` model (safetensors, bfloat16) in `out_dir`,
    initialized on the GPU when there is one (seconds, where a CPU takes minutes); reuse it if there."""
    import torch
    from transformers import LlamaForCausalLM

    out = Path(out_dir)
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(llama_1b_config(num_layers)).to(torch.bfloat16).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--llama-1b"]:
        print(build_llama_1b(args[1] if len(args) > 1 else default_midsize_dir().parent / "llama-1b-random"))
    else:
        print(build_midsize(args[0] if args else None))
