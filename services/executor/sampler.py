"""Batched token sampling: one call per step for every sequence that samples.

`logits` is `[B, V]`: one row per sequence that samples this step (B sequences, V the
vocabulary). Each row goes through, in vLLM's order:

1. penalties on the raw logits (`apply_penalties`): repetition over prompt ∪ output,
   presence and frequency over the output only; then `logit_bias` is added (`logit_bias.apply_logit_bias`)
   and tokens outside a row's `allowed_token_ids` (when it has them) are set to -inf;
2. `min_tokens`: while a sequence has fewer outputs than `min_tokens`, its EOS ids (unless
   `ignore_eos`) and `stop_token_ids` are set to -inf (`apply_min_tokens`), and so is the last id
   of each `bad_words_token_ids` sequence whose other ids the output ends with; then structured
   output: tokens a row's grammar does not allow are set to -inf, all rows at once from one
   bitmask (`mask`, see `pagedserve.executor.grammar`);
3. temperature: greedy rows (`SamplingParams.greedy`) take the argmax here; the rest are
   divided by their temperature;
4. top-k, then top-p over the top-k survivors renormalized (`apply_top_k_top_p`), then
   min-p (`apply_min_p`; it keeps tokens with prob >= min_p * max prob, which the earlier
   masks never change, since they always keep the most likely token);
5. one draw from the softmax per row by exponential race: argmax(probs / E), E ~ Exp(1)
   i.i.d., which picks token i with probability probs[i].

A row that steps 1-2 leave with no token at all samples its EOS (`_end_rows_with_nothing_left`).

Randomness: a row whose request has a `seed` draws its E from its own `torch.Generator`
seeded with `step_seed(seed, len(output_ids))`, so a seeded request gets the same tokens
whatever else is in the batch, and again after a preemption or a re-sent step. Rows without
a seed share torch's default generator for the device.

Logprobs (`params.logprobs` is not None): the sampled token's logprob and the top
`params.logprobs` alternatives, best first, from the log_softmax of the logits after
penalties, logit bias, min_tokens and temperature (one below GREEDY_TEMPERATURE counts as 1) but BEFORE top-k, top-p
and min-p truncation, so they describe the model's distribution, not the truncated one.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import Protocol

import torch

from pagedserve.common.params import GREEDY_TEMPERATURE, SamplingParams
from pagedserve.common.step import TokenLogprobs
from pagedserve.executor.logit_bias import apply_logit_bias

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(seed: int, num_output_tokens: int) -> int:
    """The generator seed for a request's next token: a stable mix of (seed, step).

    splitmix64, not Python's salted `hash`, so every process and restart agrees. 63 bits, so
    `torch.Generator.manual_seed` takes it on every device.
    """
    return _splitmix64(_splitmix64(seed & _MASK64) + num_output_tokens) >> 1


class TokenMask(Protocol):
    """Allowed tokens per row (structured output); `apply` sets the rest to -inf in place."""

    def apply(self, logits: torch.Tensor) -> None: ...


def _has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _flat_token_index(
    token_ids: Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """Flat indices `row * V + token` into a `[len(token_ids), V]` tensor, repeats kept."""
    lengths = torch.tensor([len(ids) for ids in token_ids], dtype=torch.long)  # [R]
    tokens = torch.tensor(list(chain.from_iterable(token_ids)), dtype=torch.long)  # [N]
    rows = torch.repeat_interleave(torch.arange(len(token_ids)), lengths)  # [N]
    return (rows * vocab_size + tokens).to(device)  # [N]


def apply_penalties(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
) -> torch.Tensor:
    """Repetition, presence and frequency penalties; returns a new `[B, V]` float tensor.

    Repetition: a token in prompt ∪ output has its logit divided by the penalty if positive,
    multiplied by it otherwise. Presence: minus the penalty once for a token in the output.
    Frequency: minus count × penalty for a token in the output.
    """
    num_seqs, vocab_size = logits.shape
    rows = [i for i, p in enumerate(params) if _has_penalties(p)]
    if not rows:
        return logits.clone()
    device = logits.device
    all_rows = len(rows) == num_seqs
    sub = logits if all_rows else logits[torch.tensor(rows, device=device)]  # [P, V]

    counts = torch.zeros_like(sub)  # [P, V] how often each token is in the output
    out_index = _flat_token_index([output_ids[r] for r in rows], vocab_size, device)
    counts.view(-1).index_add_(0, out_index, torch.ones_like(out_index, dtype=counts.dtype))
    in_output = counts > 0  # [P, V]

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=logits.dtype, device=device).unsqueeze(1)  # [P, 1]

    if any(params[r].repetition_penalty != 1.0 for r in rows):
        # Prompts only of the rows with a repetition penalty: the others never read `seen`.
        prompts = [prompt_ids[r] if params[r].repetition_penalty != 1.0 else () for r in rows]
        seen = in_output.clone()  # [P, V] prompt ∪ output
        seen.view(-1)[_flat_token_index(prompts, vocab_size, device)] = True
        rep = column([params[r].repetition_penalty for r in rows])
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - column([params[r].frequency_penalty for r in rows]) * counts
    sub = sub - column([params[r].presence_penalty for r in rows]) * in_output

    if all_rows:
        return sub
    return logits.index_copy(0, torch.tensor(rows, device=device), sub)


def _min_tokens_ban(
    params: Sequence[SamplingParams],
    output_ids: Sequence[Sequence[int]],
    eos_token_ids: Sequence[int],
    vocab_size: int,
) -> tuple[list[int], list[int]]:
    """(rows, token ids) to set to -inf: stop tokens of sequences still under min_tokens."""
    rows: list[int] = []
    tokens: list[int] = []
    for i, p in enumerate(params):
        if len(output_ids[i]) >= p.min_tokens:
            continue
        banned = set(p.stop_token_ids)
        if not p.ignore_eos:
            banned.update(eos_token_ids)
        # An id past the logits can never be sampled, so there is nothing to mask.
        banned = sorted(t for t in banned if 0 <= t < vocab_size)
        rows.extend([i] * len(banned))
        tokens.extend(banned)
    return rows, tokens


def _bad_words_ban(
    params: Sequence[SamplingParams], output_ids: Sequence[Sequence[int]], vocab_size: int
) -> tuple[list[int], list[int]]:
    """(rows, token ids) to set to -inf: for each of a row's bad_words_token_ids, its last id
    while the output ends with the ids before it (always, for a one-id sequence). Only the
    output counts, not the prompt: a prompt that ends with a word's first tokens does not ban
    its last."""
    rows: list[int] = []
    tokens: list[int] = []
    for i, p in enumerate(params):
        if not p.bad_words_token_ids:
            continue
        output = output_ids[i]
        banned = set()
        for ids in p.bad_words_token_ids:
            before = len(ids) - 1
            if before > len(output) or not 0 <= ids[-1] < vocab_size:
                continue
            if before == 0 or list(output[-before:]) == ids[:-1]:
                banned.add(ids[-1])
        rows.extend([i] * len(banned))
        tokens.extend(sorted(banned))
    return rows, tokens


def apply_min_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    output_ids: Sequence[Sequence[int]],
    eos_token_ids: Sequence[int],
) -> torch.Tensor:
    """While `len(output) < min_tokens`, EOS (unless ignore_eos) and stop_token_ids get -inf.

    Returns a new `[B, V]` tensor."""
    rows, tokens = _min_tokens_ban(params, output_ids, eos_token_ids, logits.shape[1])
    out = logits.clone()
    if rows:
        device = logits.device
        out[torch.tensor(rows, device=device), torch.tensor(tokens, device=device)] = float("-inf")
    return out


def _end_rows_with_nothing_left(logits: torch.Tensor, eos_token_ids: Sequence[int]) -> None:
    """A row whose every token the masks ruled out (allowed_token_ids against bad words or a
    grammar, say) gets logit 0 on its first EOS id, in place, so it samples EOS and ends, with
    logprob 0, rather than an arbitrary token with a NaN logprob. The gateway refuses the
    combinations it can see ahead (`SamplingParams.check_samplable`); this is for the rest."""
    eos = next((t for t in eos_token_ids if 0 <= t < logits.shape[1]), None)
    dead = logits.amax(dim=-1) == float("-inf")  # [B]
    if eos is not None and bool(dead.any()):
        logits[dead, eos] = 0.0


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Set to -inf what top-k and then top-p drop; returns a new `[B, V]` tensor.

    top_k `[B]` long, 0 or -1 (or >= V) for off; top_p `[B]` float, 1 for off; None: off for
    every row. Top-k keeps every token tied with the k-th largest logit. Top-p keeps the
    smallest prefix (most likely first) of the top-k survivors, renormalized, whose mass
    reaches top_p; the most likely token always stays.
    """
    vocab_size = logits.shape[1]
    neg_inf = float("-inf")
    k_off = None
    if top_k is not None:
        k_off = (top_k <= 0) | (top_k >= vocab_size)  # [B]
        top_k = top_k.masked_fill(k_off, 1)  # [B] any valid k; masked out below

    if top_p is None:
        if top_k is None:
            return logits.clone()
        # Top-k alone: a partial top-k is cheaper than a full sort of the vocabulary.
        max_k = int(top_k.max())
        top_values = logits.topk(max_k, dim=-1).values  # [B, max_k]
        kth = top_values.gather(1, (top_k - 1).unsqueeze(1))  # [B, 1]
        kth = kth.masked_fill(k_off.unsqueeze(1), neg_inf)
        return logits.masked_fill(logits < kth, neg_inf)

    sorted_logits, sorted_index = logits.sort(dim=-1, descending=True)  # [B, V] each
    if top_k is not None:
        kth = sorted_logits.gather(1, (top_k - 1).unsqueeze(1))  # [B, 1]
        kth = kth.masked_fill(k_off.unsqueeze(1), neg_inf)
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, neg_inf)
    probs = sorted_logits.softmax(dim=-1)  # [B, V]
    mass_before = probs.cumsum(dim=-1) - probs  # [B, V] mass of the tokens ranked above
    drop = mass_before >= top_p.unsqueeze(1)  # [B, V]
    sorted_logits = sorted_logits.masked_fill(drop, neg_inf)
    return torch.empty_like(logits).scatter_(1, sorted_index, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf tokens with prob < min_p * max prob; min_p `[B]`, 0 for off. New `[B, V]`.

    In logit space: keep l >= max(l) + log(min_p), with no softmax needed."""
    threshold = logits.amax(dim=-1, keepdim=True) + min_p.unsqueeze(1).log()  # [B, 1]
    return logits.masked_fill(logits < threshold, float("-inf"))


def random_sample(probs: torch.Tensor, seeds: Sequence[int | None]) -> torch.Tensor:
    """One token per row of `probs` `[R, V]` by exponential race; returns `[R]` long.

    `seeds[r]` is the generator seed for row r (see `step_seed`), or None for the shared
    default generator. A seeded row draws its V exponentials alone, from a fresh generator,
    so its token does not depend on the other rows.
    """
    noise = torch.empty_like(probs)  # [R, V]
    if any(s is None for s in seeds):
        noise.exponential_()
    for r, seed in enumerate(seeds):
        if seed is not None:
            generator = torch.Generator(device=probs.device)
            generator.manual_seed(seed)
            noise[r].exponential_(generator=generator)
    # A zero draw would make 0 / 0 = NaN on a masked token, and argmax prefers NaN.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)  # [R]


def _logprobs(
    scaled: torch.Tensor, tokens: torch.Tensor, rows: list[int], params: Sequence[SamplingParams]
) -> list[TokenLogprobs]:
    device = scaled.device
    index = torch.tensor(rows, device=device)
    logprobs = scaled[index].log_softmax(dim=-1)  # [L, V]
    chosen = logprobs.gather(1, tokens[index].unsqueeze(1)).squeeze(1).tolist()  # [L]
    max_n = max(params[r].logprobs or 0 for r in rows)
    top_values, top_ids = logprobs.topk(max_n, dim=-1)  # [L, max_n] each, best first
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    chosen_ids = tokens[index].tolist()
    result = []
    for k, r in enumerate(rows):
        n = params[r].logprobs or 0
        top = list(zip(top_ids[k][:n], top_values[k][:n], strict=True))
        result.append(TokenLogprobs(token_id=chosen_ids[k], logprob=chosen[k], top=top))
    return result


def beam_candidates(
    logits: torch.Tensor, rows: list[int], counts: list[int]
) -> list[list[tuple[int, float]]]:
    """Beam search's candidates: for each row in `rows` of `logits` `[B, V]`, its `counts[i]`
    best (token id, log-probability), best first, from log_softmax of the raw logits in
    float32, as transformers scores beams (no penalty, temperature or truncation)."""
    index = torch.tensor(rows, device=logits.device)
    logprobs = logits[index].to(torch.float32).log_softmax(dim=-1)  # [R, V]
    values, ids = logprobs.topk(max(counts), dim=-1)  # [R, max(counts)] each, best first
    values, ids = values.tolist(), ids.tolist()
    return [list(zip(ids[k][:n], values[k][:n], strict=True)) for k, n in enumerate(counts)]


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    eos_token_ids: tuple[int, ...],
    mask: TokenMask | None = None,
) -> list[tuple[int, TokenLogprobs | None]]:
    """Sample one token per row of `logits` `[B, V]` (any float dtype; computed in float32).

    `params`, `prompt_ids` and `output_ids` (generated so far) have one entry per row; `mask`
    (structured output) the tokens each constrained row may sample.
    Returns `(token_id, logprobs or None)` per row, in row order. See the module docstring
    for the order of operations, seeding, and what the logprobs are computed from (after
    penalties and temperature, before top-k/top-p/min-p truncation).
    """
    num_seqs, vocab_size = logits.shape
    if not (len(params) == len(prompt_ids) == len(output_ids) == num_seqs):
        raise ValueError(
            f"sample: {num_seqs} logits rows but {len(params)} params, "
            f"{len(prompt_ids)} prompts, {len(output_ids)} outputs"
        )
    device = logits.device
    ban_rows, ban_tokens = _min_tokens_ban(params, output_ids, eos_token_ids, vocab_size)
    bad_rows, bad_tokens = _bad_words_ban(params, output_ids, vocab_size)
    ban_rows += bad_rows
    ban_tokens += bad_tokens

    # Fast path: every row plain greedy, nothing to mask or report: no copy, no penalty, temperature,
    # top-k/top-p or softmax work. `max(dim).indices` is argmax (the first maximum on ties, NaN wins)
    # at under half the cost of `argmax` on CPU for a [B, V] float32 tensor.
    if (
        mask is None
        and not ban_rows
        and all(
            p.greedy
            and p.logprobs is None
            and not _has_penalties(p)
            and not p.logit_bias
            and not p.allowed_token_ids
            for p in params
        )
    ):
        return [(token, None) for token in logits.max(dim=-1).indices.tolist()]

    logits = apply_penalties(logits.to(torch.float32), params, prompt_ids, output_ids)  # [B, V], a copy
    apply_logit_bias(logits, params)
    if ban_rows:
        logits[torch.tensor(ban_rows, device=device), torch.tensor(ban_tokens, device=device)] = float("-inf")
    if mask is not None:
        mask.apply(logits)
    # Only these masks can leave a row with nothing (a bias is finite).
    if mask is not None or ban_rows or any(p.allowed_token_ids for p in params):
        _end_rows_with_nothing_left(logits, eos_token_ids)

    tokens = logits.argmax(dim=-1)  # [B] the answer for greedy rows
    temperatures = [p.temperature if p.temperature >= GREEDY_TEMPERATURE else 1.0 for p in params]
    scaled = logits  # [B, V]
    if any(t != 1.0 for t in temperatures):
        scaled = logits / torch.tensor(temperatures, device=device).unsqueeze(1)

    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        rp = [params[i] for i in random_rows]
        index = torch.tensor(random_rows, device=device)
        candidates = scaled if len(random_rows) == num_seqs else scaled[index]  # [R, V]
        top_k = top_p = None
        if any(0 < p.top_k < vocab_size for p in rp):
            top_k = torch.tensor([p.top_k for p in rp], dtype=torch.long, device=device)  # [R]
        if any(p.top_p < 1.0 for p in rp):
            top_p = torch.tensor([p.top_p for p in rp], dtype=torch.float32, device=device)  # [R]
        if top_k is not None or top_p is not None:
            candidates = apply_top_k_top_p(candidates, top_k, top_p)
        if any(p.min_p > 0.0 for p in rp):
            min_p = torch.tensor([p.min_p for p in rp], dtype=torch.float32, device=device)  # [R]
            candidates = apply_min_p(candidates, min_p)
        seeds = [
            None if p.seed is None else step_seed(p.seed, len(output_ids[i]))
            for i, p in zip(random_rows, rp, strict=True)
        ]
        tokens[index] = random_sample(candidates.softmax(dim=-1), seeds)

    logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    logprobs: list[TokenLogprobs | None] = [None] * num_seqs
    if logprob_rows:
        for i, lp in zip(logprob_rows, _logprobs(scaled, tokens, logprob_rows, params), strict=True):
            logprobs[i] = lp
    return list(zip(tokens.tolist(), logprobs, strict=True))
