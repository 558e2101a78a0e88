"""How the torch backend groups a step's sequences for attention: decode length buckets, and
when a prefill is attended on its own rather than padded into a group (`torch_attention`)."""

from __future__ import annotations

import torch

# What one more gather + SDPA call per layer costs, in context tokens' worth of gathering and attending
# (about 60-80 us of per-call overhead against about 0.25 us per token of a 4-KV-head, 32-wide layer
# on one core): a decode bucket is split off only when it saves more padded tokens than this.
BUCKET_SPLIT_TOKENS = 256
# A bucket's shortest context is at least this fraction of its longest, so padding stays under 4/3 of
# the real work in the worst case, with at most log(max/min) / log(4/3) buckets.
BUCKET_RATIO = 0.75


# Non-decode sequences are attended one by one when padding them to one [S, max_q_len, max_kv_len]
# problem would do more than this many times their real (rectangular q_len x seq_len) work; one
# more SDPA call costs about what a few thousand query-key pairs do, so small steps stay batched.
EACH_WASTE = 2.0
EACH_MIN_PAIRS = 4096


def pad_waste(q_lens: torch.Tensor, seq_lens: torch.Tensor) -> float:
    """Padded work over real work of attending these sequences as one padded group (1.0: none)."""
    real = int((q_lens * seq_lens).sum())
    padded = q_lens.numel() * int(q_lens.max()) * int(seq_lens.max())
    if padded < EACH_MIN_PAIRS * q_lens.numel():
        return 1.0
    return padded / max(real, 1)


def length_buckets(seqs: torch.Tensor, seq_lens: torch.Tensor) -> list[torch.Tensor]:
    """Splits the decode sequences `seqs` [S] (context lengths `seq_lens` [S]) into groups that are
    each padded to their own longest context, so that one long context does not pad every other.

    Longest first; a sequence starts a new group when its context is under BUCKET_RATIO of the
    group's longest and moving it and every shorter one out saves more than BUCKET_SPLIT_TOKENS
    padded tokens (remaining * (group max - its length)). When nothing splits, the group keeps the
    original order (adjacent decode tokens stay a slice)."""
    if seqs.numel() == 0:
        return []
    lens = seq_lens.tolist()
    if min(lens) > BUCKET_RATIO * max(lens):
        return [seqs]
    order = sorted(range(len(lens)), key=lambda i: -lens[i])
    buckets: list[list[int]] = [[]]
    group_max = lens[order[0]]
    for rank, i in enumerate(order):
        remaining = len(order) - rank
        if lens[i] < BUCKET_RATIO * group_max and remaining * (group_max - lens[i]) > BUCKET_SPLIT_TOKENS:
            buckets.append([])
            group_max = lens[i]
        buckets[-1].append(i)
    if len(buckets) == 1:
        return [seqs]
    return [seqs[torch.tensor(bucket, device=seqs.device)] for bucket in buckets]


def attend_one_by_one(q_lens: torch.Tensor, seq_lens: torch.Tensor) -> bool:
    """Whether these non-decode sequences go one SDPA call each rather than one padded group."""
    return pad_waste(q_lens, seq_lens) > EACH_WASTE
