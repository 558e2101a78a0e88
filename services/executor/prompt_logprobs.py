"""Prompt log-probabilities: logits kept at the prompt positions of the requests that ask.

A sequence whose `sampling.prompt_logprobs` is set gets, for every prompt position p that a
step computes with p < len(prompt) - 1, the log_softmax of the raw logits at p (no penalties,
no temperature: the model's own distribution, as `transformers` gives it) gathered at prompt
token p + 1, and the top k. The last prompt position is not among them: its logits sample the
first generated token (the sampler's row). Chunked prefill needs nothing special: each chunk
answers for its own positions, tagged with the prompt index of its first token, and the
scheduler puts the chunks back in order.

The rows ride along in the same forward: their flat token indices are appended to the sampled
rows' in `logits_to_keep`, so logits come back `[N + E, V]` and the first N go to the sampler.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pagedserve.common.step import PromptLogprobs, TokenLogprobs
from pagedserve.executor.step_plan import ScheduledRequest

# log_softmax over this many rows at a time bounds the extra memory to [CHUNK_ROWS, V] floats
# whatever the prompt length.
CHUNK_ROWS = 256


class PromptRows(NamedTuple):
    """One sequence's prompt positions in a step: logits rows [row, row + len(targets))."""

    request_id: str
    first_token_index: int  # the prompt index of targets[0] (position + 1)
    targets: list[int]  # the prompt tokens each position's logits are gathered at
    k: int  # top alternatives asked for


def plan_prompt_rows(scheduled: list[ScheduledRequest]) -> tuple[list[int], list[PromptRows]]:
    """The flat token indices (in the step's packed order: `scheduled`'s) whose logits the
    prompt logprobs need, and which sequence and prompt tokens they belong to, in that order."""
    indices: list[int] = []
    rows: list[PromptRows] = []
    offset = 0  # flat index of the sequence's first scheduled token
    for s in scheduled:
        k = s.state.sampling.prompt_logprobs
        start = s.state.num_computed_tokens
        stop = min(start + s.num_tokens, len(s.state.prompt_token_ids) - 1)  # positions [start, stop)
        if k is not None and stop > start:
            indices.extend(range(offset, offset + stop - start))
            targets = s.state.prompt_token_ids[start + 1 : stop + 1]
            rows.append(PromptRows(s.state.request_id, start + 1, targets, k))
        offset += s.num_tokens
    return indices, rows


def gather_prompt_logprobs(logits: torch.Tensor, rows: list[PromptRows]) -> list[PromptLogprobs]:
    """`logits` [E, V] float32, E = the rows' targets in order; one `PromptLogprobs` per row."""
    targets = torch.tensor([t for r in rows for t in r.targets], dtype=torch.long, device=logits.device)
    max_k = max(r.k for r in rows)
    chosen: list[float] = []
    ranks: list[int] = []
    top_ids: list[list[int]] = []
    top_values: list[list[float]] = []
    for lo in range(0, logits.shape[0], CHUNK_ROWS):
        logprobs = logits[lo : lo + CHUNK_ROWS].log_softmax(dim=-1)  # [C, V]
        picked = logprobs.gather(1, targets[lo : lo + CHUNK_ROWS, None]).squeeze(1)  # [C]
        chosen.extend(picked.tolist())
        ranks.extend(((logprobs > picked[:, None]).sum(dim=-1) + 1).tolist())  # [C]
        if max_k:
            values, ids = logprobs.topk(max_k, dim=-1)  # [C, max_k] each, best first
            top_values.extend(values.tolist())
            top_ids.extend(ids.tolist())
    result = []
    i = 0
    for r in rows:
        entries = []
        for target in r.targets:
            top = list(zip(top_ids[i][: r.k], top_values[i][: r.k], strict=True)) if r.k else []
            entries.append(TokenLogprobs(token_id=target, logprob=chosen[i], top=top, rank=ranks[i]))
            i += 1
        result.append(PromptLogprobs(r.request_id, r.first_token_index, entries))
    return result
