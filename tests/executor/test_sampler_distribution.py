"""The batched sampler's top-k, top-p, min-p, temperature and min_tokens against plain per-row
references (Python loops, float64).

Exact where the answer is exact (allowed-token sets, the tokens min_tokens masks); statistical
checks use fixed seeds and state their tolerance.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from pagedserve.common.params import SamplingParams
from pagedserve.executor.sampler import apply_min_p, apply_top_k_top_p, sample

EOS = (2,)


# --- plain references -------------------------------------------------------------------


def ref_allowed(row: list[float], top_k: int, top_p: float, min_p: float) -> set[int]:
    """Tokens top-k, then top-p (renormalized over the top-k), then min-p leave."""
    order = sorted(range(len(row)), key=lambda t: -row[t])
    kept = order
    if 0 < top_k < len(row):
        kth = row[order[top_k - 1]]
        kept = [t for t in order if row[t] >= kth]
    top = row[kept[0]]
    weights = {t: math.exp(row[t] - top) for t in kept}
    total = sum(weights.values())
    nucleus, mass = [], 0.0
    for t in kept:
        if mass >= top_p:
            break
        nucleus.append(t)
        mass += weights[t] / total
    return {t for t in nucleus if weights[t] >= min_p}  # weights[t] = p_t / p_max


def ref_distribution(row: list[float], allowed: set[int]) -> dict[int, float]:
    top = max(row[t] for t in allowed)
    weights = {t: math.exp(row[t] - top) for t in allowed}
    total = sum(weights.values())
    return {t: w / total for t, w in weights.items()}


def total_variation(counts: Counter[int], dist: dict[int, float], n: int) -> float:
    tokens = set(counts) | set(dist)
    return 0.5 * sum(abs(counts[t] / n - dist.get(t, 0.0)) for t in tokens)


def draw_many(row: torch.Tensor, p: SamplingParams, n: int) -> Counter[int]:
    """n independent draws of one row: the row repeated n times in one batch."""
    logits = row.unsqueeze(0).expand(n, -1).contiguous()
    out = sample(logits, [p] * n, [[] for _ in range(n)], [[] for _ in range(n)], EOS)
    return Counter(token for token, _ in out)


# --- top-k, top-p, min-p ----------------------------------------------------------------


def test_masks_match_reference_allowed_sets():
    gen = torch.Generator().manual_seed(5)
    num_seqs, vocab = 300, 40
    logits = torch.randn(num_seqs, vocab, generator=gen) * 2.0
    top_k = torch.randint(-1, vocab + 2, (num_seqs,), generator=gen)
    top_k[::3] = 0
    top_p = torch.rand(num_seqs, generator=gen) * 0.95 + 0.05
    top_p[::4] = 1.0
    min_p = torch.rand(num_seqs, generator=gen) * 0.3
    min_p[::5] = 0.0
    both = apply_min_p(apply_top_k_top_p(logits, top_k, top_p), min_p)
    only_k = apply_top_k_top_p(logits, top_k, None)
    only_p = apply_top_k_top_p(logits, None, top_p)
    for i in range(num_seqs):
        row = logits[i].tolist()
        k, p, m = int(top_k[i]), float(top_p[i]), float(min_p[i])
        assert set(torch.isfinite(both[i]).nonzero().flatten().tolist()) == ref_allowed(row, k, p, m), i
        assert set(torch.isfinite(only_k[i]).nonzero().flatten().tolist()) == ref_allowed(row, k, 1.0, 0.0)
        assert set(torch.isfinite(only_p[i]).nonzero().flatten().tolist()) == ref_allowed(row, 0, p, 0.0)
        kept = torch.isfinite(both[i])
        assert torch.equal(both[i][kept], logits[i][kept])  # surviving logits untouched


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_k=5),
        SamplingParams(temperature=0.7, top_p=0.8),
        SamplingParams(temperature=1.3, min_p=0.1),
        SamplingParams(temperature=0.9, top_k=8, top_p=0.9, min_p=0.05),
        SamplingParams(temperature=1.0, top_k=-1, top_p=1.0),
    ],
    ids=["top_k", "top_p", "min_p", "all", "none"],
)
def test_sampled_set_and_frequencies_match_reference(params):
    torch.manual_seed(6)
    row = torch.randn(20, generator=torch.Generator().manual_seed(7)) * 1.5  # [V]
    n = 8000
    counts = draw_many(row, params, n)
    scaled = (row / params.temperature).tolist()
    allowed = ref_allowed(scaled, params.top_k, params.top_p, params.min_p)
    assert set(counts) == allowed
    # Expected total variation at n = 8000 over <= 20 tokens is about 0.015.
    assert total_variation(counts, ref_distribution(scaled, allowed), n) < 0.04


def test_temperature_sharpens():
    torch.manual_seed(8)
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0])
    n = 20000
    entropies = []
    for temperature in (0.5, 1.0, 2.0):
        counts = draw_many(row, SamplingParams(temperature=temperature), n)
        dist = ref_distribution((row / temperature).tolist(), set(range(8)))
        # Expected total variation at n = 20000 over 8 tokens is about 0.006.
        assert total_variation(counts, dist, n) < 0.02
        freqs = [counts[t] / n for t in range(8)]
        entropies.append(-sum(f * math.log(f) for f in freqs if f > 0))
    assert entropies[0] < entropies[1] < entropies[2]


# --- min_tokens -------------------------------------------------------------------------


def test_min_tokens_masks_eos_and_stop_tokens():
    vocab = 12
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(9))
    logits[7], logits[9], logits[4] = 10.0, 9.0, 8.0  # stop token, EOS, the best of the rest
    eos = (9, 50)  # an EOS id past the logits is ignored
    greedy = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[7])
    no_eos = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[7], ignore_eos=True)

    def token(p: SamplingParams, num_out: int) -> int:
        return sample(logits.unsqueeze(0), [p], [[1]], [[0] * num_out], eos)[0][0]

    assert [token(greedy, k) for k in range(5)] == [4, 4, 4, 7, 7]
    assert [token(no_eos, k) for k in range(5)] == [9, 9, 9, 7, 7]


def test_min_tokens_masks_eos_when_sampling():
    torch.manual_seed(10)
    logits = torch.zeros(2000, 6)
    logits[:, 2] = 3.0  # EOS would be most draws
    logits[:, 5] = 2.0
    params = [SamplingParams(temperature=1.0, min_tokens=2, stop_token_ids=[5], logprobs=2)] * 2000
    under = sample(logits, params, [[]] * 2000, [[1]] * 2000, EOS)
    assert {t for t, _ in under} == {0, 1, 3, 4}
    assert under[0][1].top[0][1] > -math.inf and all(t not in (2, 5) for t, _ in under[0][1].top)
    done = sample(logits, params, [[]] * 2000, [[1, 1]] * 2000, EOS)
    assert {2, 5} <= {t for t, _ in done}
