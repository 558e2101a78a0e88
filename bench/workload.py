"""Workloads (what to send) and arrivals (when to send it), all seeded.

A workload is a list of `BenchRequest`: prompt token ids and an exact output length (every
request is sent with ignore_eos and max_tokens = output_len, so every system under test
generates the same number of tokens for the same prompt).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

FIRST_ORDINARY_ID = 3  # the bundled model's ids 0..2 are bos, eos and pad


@dataclass(frozen=True, slots=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int
    n: int = 1  # parallel samples of the same prompt


def _random_ids(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    return [rng.randrange(FIRST_ORDINARY_ID, vocab_size) for _ in range(n)]


def _lognormal(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return max(lo, min(int(rng.lognormvariate(math.log(median), sigma)), hi))


def sharegpt_like(
    num_requests: int,
    *,
    vocab_size: int,
    max_model_len: int,
    prompt_median: float = 128,
    output_median: float = 96,
    sigma: float = 0.8,
    seed: int = 0,
) -> list[BenchRequest]:
    """ShareGPT-shaped lengths: lognormal prompt and output lengths (medians given, shared
    sigma), prompt clipped to half the context and output to what is left of it."""
    rng = random.Random(seed)
    out = []
    for _ in range(num_requests):
        prompt = _lognormal(rng, prompt_median, sigma, 4, max_model_len // 2)
        output = _lognormal(rng, output_median, sigma, 2, max_model_len - prompt)
        out.append(BenchRequest(_random_ids(rng, prompt, vocab_size), output))
    return out


def alpaca_like(
    num_requests: int,
    *,
    vocab_size: int,
    prompt_median: float = 20,
    output_median: float = 60,
    sigma: float = 0.5,
    max_prompt: int = 96,
    max_output: int = 128,
    seed: int = 0,
) -> list[BenchRequest]:
    """Alpaca-shaped lengths: short instructions (lognormal around `prompt_median`) and answers
    of a few sentences (lognormal around `output_median`, half the spread), both clipped."""
    rng = random.Random(seed)
    out = []
    for _ in range(num_requests):
        prompt = _lognormal(rng, prompt_median, sigma, 4, max_prompt)
        output = _lognormal(rng, output_median, sigma / 2, 8, max_output)
        out.append(BenchRequest(_random_ids(rng, prompt, vocab_size), output))
    return out


def fixed_lengths(
    num_requests: int, *, vocab_size: int, prompt_len: int, output_len: int, seed: int = 0
) -> list[BenchRequest]:
    rng = random.Random(seed)
    return [BenchRequest(_random_ids(rng, prompt_len, vocab_size), output_len) for _ in range(num_requests)]


def shared_prefix(
    num_requests: int,
    *,
    vocab_size: int,
    system_len: int,
    user_len: int,
    output_len: int,
    shared: bool = True,
    seed: int = 0,
) -> list[BenchRequest]:
    """One system prompt of `system_len` tokens before every request's own `user_len` tokens;
    with shared=False every request gets its own system prompt of the same length (the
    same KV demand, nothing to share)."""
    rng = random.Random(seed)
    system = _random_ids(rng, system_len, vocab_size)
    out = []
    for _ in range(num_requests):
        prefix = system if shared else _random_ids(rng, system_len, vocab_size)
        out.append(BenchRequest(prefix + _random_ids(rng, user_len, vocab_size), output_len))
    return out


def from_jsonl(
    path: str | Path, tokenizer_path: str | Path, default_output_len: int = 64
) -> list[BenchRequest]:
    """One JSON object a line: "prompt" (text, encoded with the model's tokenizer.json) or
    "prompt_token_ids", and optionally "output_len" (else `default_output_len`)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(tokenizer_path) / "tokenizer.json"))
    out = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        ids = row.get("prompt_token_ids") or tokenizer.encode(row["prompt"]).ids
        out.append(BenchRequest(list(ids), int(row.get("output_len", default_output_len))))
    return out


def arrival_times(num_requests: int, rate: float | None, seed: int = 0) -> list[float]:
    """Send offsets in seconds: all at 0 for rate None (or inf), else a Poisson process."""
    if rate is None or rate == float("inf"):
        return [0.0] * num_requests
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(num_requests):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def uniform_lengths(
    num_requests: int,
    *,
    vocab_size: int,
    prompt_range: tuple[int, int],
    output_range: tuple[int, int],
    seed: int = 0,
) -> list[BenchRequest]:
    """Prompt and output lengths drawn uniformly from the inclusive ranges given."""
    rng = random.Random(seed)
    out = []
    for _ in range(num_requests):
        prompt = rng.randint(*prompt_range)
        output = rng.randint(*output_range)
        out.append(BenchRequest(_random_ids(rng, prompt, vocab_size), output))
    return out
