"""The bundled model (models/tiny-py) and the script that trains it (models/train.py).

Every other test and `pagedserve up` default to this folder, so it must load offline with plain
transformers, stay small enough to commit, and generate; and the script that made it must still run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[2]
BUNDLED = REPO / "models" / "tiny-py"
TRAIN_SCRIPT = REPO / "models" / "train.py"
MAX_BUNDLE_BYTES = 25 * 1024 * 1024
CHAT = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "Write a Python function: Return the square of x."},
]

# A few small files for the training script's own corpus, so the test never reads the stdlib.
TINY_CORPUS = {
    "geometry.py": 'def area(width, height):\n    """Return the area of a rectangle."""\n    return width * height\n',
    "greet.py": 'import sys\n\n\ndef greet(name):\n    """Say hello."""\n    print(f"hello {name}")\n',
    "pkg/counter.py": "class Counter:\n    def __init__(self):\n        self.count = 0\n\n"
    "    def add(self, n=1):\n        self.count += n\n        return self.count\n",
}


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach the Hugging Face hub fails the test instead of hanging."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def greedy_completion(path: Path, prompt_ids: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, str]:
    """Greedy-generate from `prompt_ids` [1, P]; return the new ids [N] and their text."""
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        out = model.generate(
            prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    new_ids = out[0, prompt_ids.shape[1] :]
    return new_ids, tokenizer.decode(new_ids, skip_special_tokens=True)


def test_bundled_model_is_small_and_a_llama() -> None:
    size = sum(f.stat().st_size for f in BUNDLED.rglob("*") if f.is_file())
    assert size <= MAX_BUNDLE_BYTES, f"{BUNDLED} is {size / 2**20:.1f} MiB"
    assert (BUNDLED / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(BUNDLED)
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED)
    assert model.config.model_type == "llama"
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_attention_heads > model.config.num_key_value_heads, "GQA expected"
    assert model.config.vocab_size == len(tokenizer)
    assert next(model.parameters()).dtype == torch.float32
    assert None not in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert tokenizer.eos_token_id in model.generation_config.eos_token_id


def test_bundled_model_completes_code() -> None:
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED)
    prompt = tokenizer("import os\n", return_tensors="pt")["input_ids"]  # [1, P]
    assert prompt[0, 0].item() == tokenizer.bos_token_id
    new_ids, text = greedy_completion(BUNDLED, prompt, max_new_tokens=40)
    assert len(new_ids) > 0
    assert text.strip(), f"empty completion from ids {new_ids.tolist()}"


def test_bundled_chat_template_renders_and_generates() -> None:
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED)
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|bos|><|system|>\nYou write Python.<|end|>\n"
        "<|user|>\nWrite a Python function: Return the square of x.<|end|>\n<|assistant|>\n"
    )
    without_prompt = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=False)
    assert not without_prompt.endswith("<|assistant|>\n")
    ids = tokenizer(rendered, add_special_tokens=False, return_tensors="pt")["input_ids"]  # [1, P]
    # Each role marker is one special token, and the rendered prompt begins with exactly one bos.
    tokens = tokenizer.convert_ids_to_tokens(ids[0])
    assert tokens[:2] == ["<|bos|>", "<|system|>"] and tokens.count("<|bos|>") == 1
    _, text = greedy_completion(BUNDLED, ids, max_new_tokens=40)
    assert text.strip()


def test_train_script_runs_end_to_end(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    for name, text in TINY_CORPUS.items():
        (corpus / name).parent.mkdir(parents=True, exist_ok=True)
        (corpus / name).write_text(text)
    out = tmp_path / "model"
    cmd = [
        sys.executable, str(TRAIN_SCRIPT), "--corpus-dir", str(corpus), "--out", str(out),
        "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--vocab-size", "300",
        "--hidden-size", "32", "--num-layers", "2", "--num-heads", "4", "--num-kv-heads", "2",
        "--intermediate-size", "64", "--log-every", "1",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "step     3  loss" in proc.stdout

    for name in (
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "TRAINING.json",
    ):
        assert (out / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_key_value_heads == 2 and model.config.vocab_size == len(tokenizer)
    assert tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True).endswith(
        "<|assistant|>\n"
    )
    prompt = tokenizer("def ", return_tensors="pt")["input_ids"]  # [1, P]
    # An untrained model may pick any token, special ones included; min_new_tokens keeps it going.
    with torch.no_grad():
        out_ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                 min_new_tokens=8, do_sample=False)  # fmt: skip
    assert out_ids.shape == (1, prompt.shape[1] + 8)
