"""A request's logit bias and allowed token ids applied to its logits row (the sampler's step 1,
after the penalties)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from pagedserve.common.params import SamplingParams


class _IdTensors:
    """Each request's logit bias and allowed ids as tensors, built once: a request's
    SamplingParams object lives as long as it does, and the same one comes back every step. Kept
    by identity (the entry holds the object, so its id is not reused while cached), the least
    recently used dropped past `size`."""

    def __init__(self, size: int = 1024) -> None:
        self.size = size
        # id(params) -> (params, vocab size, bias ids, biases, allowed ids)
        self._entries: OrderedDict[int, tuple] = OrderedDict()

    def get(self, p: SamplingParams, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(bias token ids, their biases, allowed ids), each cut to ids in [0, vocab_size)."""
        entry = self._entries.get(id(p))
        if entry is None or entry[0] is not p or entry[1] != vocab_size:
            tokens = torch.tensor(list(p.logit_bias), dtype=torch.long)
            values = torch.tensor(list(p.logit_bias.values()), dtype=torch.float32)
            allowed = torch.tensor(p.allowed_token_ids, dtype=torch.long)
            keep = (tokens >= 0) & (tokens < vocab_size)
            allowed = allowed[(allowed >= 0) & (allowed < vocab_size)]
            entry = (p, vocab_size, tokens[keep], values[keep], allowed)
            self._entries[id(p)] = entry
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(id(p))
        return entry[2], entry[3], entry[4]


_id_tensors = _IdTensors()


def apply_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> None:
    """Adds each row's `logit_bias` to its logits, then leaves only its `allowed_token_ids` (when
    it has them) finite; in place (an id past the logits has nothing to act on)."""
    vocab_size = logits.shape[1]
    device = logits.device
    rows, tokens, values = [], [], []
    for i, p in enumerate(params):
        if p.logit_bias:
            t, v, _ = _id_tensors.get(p, vocab_size)
            rows.append(torch.full((t.numel(),), i, dtype=torch.long))
            tokens.append(t)
            values.append(v)
    if rows:
        index = (torch.cat(rows).to(device), torch.cat(tokens).to(device))
        logits.index_put_(index, torch.cat(values).to(device, logits.dtype), accumulate=True)
    for i, p in enumerate(params):
        if p.allowed_token_ids:
            allowed = _id_tensors.get(p, vocab_size)[2].to(device)
            if not allowed.numel():  # none exists in the logits: leave the row as it is
                continue
            kept = logits[i, allowed]
            logits[i] = float("-inf")
            logits[i, allowed] = kept
