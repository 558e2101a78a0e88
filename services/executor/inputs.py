"""Packing a step's scheduled tokens into one flat batch: ids, positions, slots, block tables."""

from __future__ import annotations

from typing import NamedTuple

import torch

from pagedserve.common.sizes import cdiv


class ScheduledSeq(NamedTuple):
    """One sequence's share of a step, as the engine hands it to `prepare_inputs`."""

    token_ids: list[int]  # every known token (prompt + outputs); the step reads [start, start + num_tokens)
    block_ids: list[int]  # the block table, covering at least start + num_tokens slots
    start: int  # num_computed_tokens before the step
    num_tokens: int  # num_scheduled_tokens
    sample: bool  # whether a token is sampled after the last scheduled one


class StepInputs(NamedTuple):
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    block_table: torch.Tensor  # [S, max_blocks] int32
    seq_lens: torch.Tensor  # [S] int32
    cu_seqlens_q: torch.Tensor  # [S + 1] int32
    sample_indices: torch.Tensor  # [N] int64, flat token index of each sampled sequence's last token


def prepare_inputs(seqs: list[ScheduledSeq], block_size: int, device: torch.device) -> StepInputs:
    """Packs the scheduled tokens of all sequences back to back, in order."""
    input_ids: list[int] = []
    q_lens: list[int] = []
    starts: list[int] = []
    sample_indices: list[int] = []
    max_blocks = 1
    for seq in seqs:
        end = seq.start + seq.num_tokens
        input_ids.extend(seq.token_ids[seq.start : end])
        q_lens.append(seq.num_tokens)
        starts.append(seq.start)
        if seq.sample:
            sample_indices.append(len(input_ids) - 1)
        max_blocks = max(max_blocks, cdiv(end, block_size))
    # Only the blocks a sequence's context covers go in; the rest of each row is padding (never read).
    rows = []
    for seq in seqs:
        used = seq.block_ids[: cdiv(seq.start + seq.num_tokens, block_size)]
        rows.append(used + [0] * (max_blocks - len(used)))
    block_table = torch.tensor(rows, dtype=torch.int32)  # [S, max_blocks]

    q_lens_t = torch.tensor(q_lens, dtype=torch.int64)  # [S]
    cu_seqlens_q = torch.zeros(len(seqs) + 1, dtype=torch.int64)  # [S + 1]
    torch.cumsum(q_lens_t, 0, out=cu_seqlens_q[1:])
    num_tokens = len(input_ids)
    seq_of_token = torch.repeat_interleave(torch.arange(len(seqs)), q_lens_t)  # [T]
    local = torch.arange(num_tokens) - cu_seqlens_q[seq_of_token]  # [T]
    positions = torch.tensor(starts, dtype=torch.int64)[seq_of_token] + local  # [T]
    slot_mapping = (
        block_table[seq_of_token, positions // block_size].long() * block_size + positions % block_size
    )  # [T]
    seq_lens = torch.tensor(starts, dtype=torch.int64) + q_lens_t  # [S]

    def to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return t.to(device=device, dtype=dtype, non_blocking=True)

    return StepInputs(
        input_ids=to(torch.tensor(input_ids, dtype=torch.int64), torch.int64),
        positions=to(positions, torch.int64),
        slot_mapping=to(slot_mapping, torch.int64),
        block_table=to(block_table, torch.int32),
        seq_lens=to(seq_lens, torch.int32),
        cu_seqlens_q=to(cu_seqlens_q, torch.int32),
        sample_indices=to(torch.tensor(sample_indices, dtype=torch.int64), torch.int64),
    )
