"""Grammar libraries for structured output, measured on this machine's CPU with the bundled tokenizer.

For each of xgrammar and llguidance that is installed (`pip install llguidance` to compare; only
xgrammar is a dependency): tokenizer set-up, compiling a typical JSON schema and a regex, filling
the next-token bitmask for a batch of 32 matchers per step while they walk a valid answer (each a
few tokens apart, so the rows are in different states), and
applying the `[32, V]` bitmask to float32 logits on the CPU. Medians; see docs/STRUCTURED_OUTPUTS.md.

    python -m pagedserve.bench.grammar_compare [--model models/tiny-py] [--batch 32]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from collections.abc import Callable

import torch
from transformers import AutoConfig, AutoTokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}
ANSWER = {"name": "Ada Lovelace", "age": 36, "color": "blue", "tags": ["math", "poet"]}
REGEX = r"[a-z]{1,10}@[a-z]{1,10}\.com"


def _ms(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


STAGGER = 8  # matcher i runs i % STAGGER tokens ahead, so the rows are in different states


def _walk(
    fill: Callable[[], None], apply: Callable[[torch.Tensor], None], advance, ids, logits
) -> tuple[float, float]:
    """Median ms per step to fill the batch's bitmask and to apply it, as the matchers walk the
    answer; `advance(step)` moves every matcher one token on."""
    fills, applies = [], []
    for step in range(len(ids) - STAGGER):
        start = time.perf_counter()
        fill()
        fills.append(time.perf_counter() - start)
        scratch = logits.clone()
        start = time.perf_counter()
        apply(scratch)
        applies.append(time.perf_counter() - start)
        advance(step)
    return statistics.median(fills) * 1e3, statistics.median(applies) * 1e3


def _stagger(matchers: list, accept: Callable[[object, int], bool], ids: list[int]) -> Callable[[int], None]:
    """Put matcher i `i % STAGGER` tokens ahead; the returned `advance(step)` keeps them so."""
    for i, m in enumerate(matchers):
        for token in ids[: i % STAGGER]:
            assert accept(m, token)

    def advance(step: int) -> None:
        for i, m in enumerate(matchers):
            assert accept(m, ids[step + i % STAGGER])

    return advance


def bench_xgrammar(hf, vocab_size: int, batch: int, ids: list[int], logits: torch.Tensor) -> dict[str, float]:
    import xgrammar as xgr

    start = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size)
    setup = (time.perf_counter() - start) * 1e3
    schema = json.dumps(SCHEMA)

    def compiler():
        return xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    compiled = compiler().compile_json_schema(schema, any_whitespace=False)
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
    bitmask = xgr.allocate_token_bitmask(batch, vocab_size)

    def fill() -> None:
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)

    advance = _stagger(matchers, lambda m, t: m.accept_token(t), ids)
    fill_ms, apply_ms = _walk(
        fill, lambda x: xgr.apply_token_bitmask_inplace(x, bitmask), advance, ids, logits
    )
    return {
        "tokenizer set-up ms": setup,
        "compile JSON schema ms": _ms(
            lambda: compiler().compile_json_schema(schema, any_whitespace=False), 5
        ),
        "compile regex ms": _ms(lambda: compiler().compile_regex(REGEX), 5),
        f"fill mask, batch {batch}, ms/step": fill_ms,
        f"apply mask [{batch}, V], ms/step": apply_ms,
    }


def bench_llguidance(
    hf, vocab_size: int, batch: int, ids: list[int], logits: torch.Tensor
) -> dict[str, float]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    start = time.perf_counter()
    tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=vocab_size)
    setup = (time.perf_counter() - start) * 1e3
    defaults = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

    def compile_schema():
        return llguidance.LLMatcher(
            tokenizer, llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults=defaults)
        )

    matchers = [compile_schema() for _ in range(batch)]
    bitmask = llguidance.torch.allocate_token_bitmask(batch, vocab_size)

    def fill() -> None:
        for i, m in enumerate(matchers):
            llguidance.torch.fill_next_token_bitmask(m, bitmask, i)

    advance = _stagger(matchers, lambda m, t: m.consume_token(t), ids)
    apply = lambda x: llguidance.torch.apply_token_bitmask_inplace(x, bitmask)  # noqa: E731
    fill_ms, apply_ms = _walk(fill, apply, advance, ids, logits)
    return {
        "tokenizer set-up ms": setup,
        "compile JSON schema ms": _ms(compile_schema, 5),
        "compile regex ms": _ms(
            lambda: llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_regex(REGEX)), 5
        ),
        f"fill mask, batch {batch}, ms/step": fill_ms,
        f"apply mask [{batch}, V], ms/step": apply_ms,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/tiny-py")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    hf = AutoTokenizer.from_pretrained(args.model)
    vocab_size = AutoConfig.from_pretrained(args.model).vocab_size
    ids = hf.encode(json.dumps(ANSWER), add_special_tokens=False)
    logits = torch.randn(args.batch, vocab_size)
    print(
        f"vocabulary {vocab_size}, answer of {len(ids)} tokens, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    for name, bench in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
        if importlib.util.find_spec(name) is None:
            print(f"{name}: not installed")
            continue
        for key, value in bench(hf, vocab_size, args.batch, ids, logits).items():
            print(f"{name:11s} {key:32s} {value:8.3f}")


if __name__ == "__main__":
    main()
