"""Greedy outputs of the executor are token-identical to transformers' `generate`.

Eight prompts of mixed lengths run as one batch through `ExecutorEngine.execute_step` with shuffled,
incrementally appended block tables, against `generate` run per prompt, unpadded; again with every
prefill split into three chunks and arrivals staggered, so steps mix prefill chunks and decodes.
"""

from __future__ import annotations

import pytest
from executor_harness import PROMPT_LENGTHS, VOCAB, StepDriver, make_prompts, reference_greedy

MAX_NEW_TOKENS = 34
FAMILIES = ["llama", "qwen2", "mistral", "gpt2"]

BUNDLED_TEXTS = [
    "import os\n",
    "def add(a, b):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "# Return the square of x.\ndef square(x):\n",
    "for i in range(10):\n    if i % 2 == 0:\n",
    "x",
    'def greet(name):\n    """Say hello to name."""\n    print(f"hello {name}")\n\n\ndef main():\n',
    "import sys\nimport json\n\n\ndef load(path):\n    with open(path) as f:\n        return json.load(f)\n",
]

_references: dict[str, list[list[int]]] = {}


def _reference(key: str, path, prompts: list[list[int]]) -> list[list[int]]:
    if key not in _references:
        _references[key] = reference_greedy(path, prompts, MAX_NEW_TOKENS)
    return _references[key]


@pytest.mark.parametrize("num_chunks", [1, 3], ids=["whole-prefill", "3-chunk-prefill"])
@pytest.mark.parametrize("family", FAMILIES)
def test_random_model_matches_generate(family, num_chunks, tiny_model_dir, make_engine) -> None:
    path = tiny_model_dir(family)
    prompts = make_prompts(PROMPT_LENGTHS, VOCAB, seed=1)
    expected = _reference(family, path, prompts)
    engine = make_engine(path)
    got = StepDriver(engine, seed=num_chunks).run(prompts, MAX_NEW_TOKENS, num_chunks, stagger=num_chunks)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g == e, f"{family} prompt {i} (length {len(prompts[i])})"


@pytest.mark.parametrize("num_chunks", [1, 3], ids=["whole-prefill", "3-chunk-prefill"])
def test_bundled_model_matches_generate(num_chunks, bundled_model_path, make_engine) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path)
    texts = BUNDLED_TEXTS
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    assert len({len(p) for p in prompts}) > 4 and max(len(p) for p in prompts) > 32
    expected = _reference("bundled", bundled_model_path, prompts)
    engine = make_engine(bundled_model_path, block_size=16, num_kv_blocks=64, max_model_len=512)
    got = StepDriver(engine, seed=num_chunks).run(prompts, MAX_NEW_TOKENS, num_chunks, stagger=num_chunks)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g == e, f"bundled prompt {i}: {texts[i]!r}"


def test_compiled_forward_matches_generate(bundled_model_path, make_engine) -> None:
    """--compile: the torch.compile'd forward (paged attention as a custom op) stays token-identical
    to `generate`, whole and chunked prefills, with no recompile after start-up. The chunked run has
    steps that sample no row (prefill chunks only), which run eager: compiled, inductor dropped their
    layers and so their KV writes."""
    import torch._dynamo
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path)
    prompts = [tokenizer(t)["input_ids"] for t in BUNDLED_TEXTS]
    expected = _reference("bundled", bundled_model_path, prompts)
    torch._dynamo.reset()
    engine = make_engine(bundled_model_path, block_size=16, num_kv_blocks=64, max_model_len=512, compile=True)
    assert engine.runner.compiled is not None
    counters = torch._dynamo.utils.counters
    frames_after_startup = dict(counters["frames"])
    for num_chunks in (1, 3):
        got = StepDriver(engine, seed=num_chunks).run(prompts, MAX_NEW_TOKENS, num_chunks, stagger=num_chunks)
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            assert g == e, f"compiled, {num_chunks}-chunk prefill, prompt {i}: {BUNDLED_TEXTS[i]!r}"
    assert dict(counters["frames"]) == frames_after_startup, "a step recompiled the forward"
    torch._dynamo.reset()
