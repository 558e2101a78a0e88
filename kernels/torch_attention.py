"""The torch backend's paged attention, planned once per step (see `torch_backend` for the layouts).

An `AttentionPlan` works on groups of sequences: decodes (q_len == 1) and the rest (prefills and
chunked prefills), so a long prefill never pads every decode query to its length; decodes of very
different context lengths are further split into a few length buckets (`length_buckets`), so one
long context does not pad every short one to its length (padding is gathered and attended like real
context: with contexts spread over 32-448 tokens, one bucket does 1.6x the needed work). For each
group it gathers K/V for all its sequences at once into [num_seqs, kv_len, num_kv_heads, head_dim],
pads the queries into [num_seqs, max_q_len] with index tensors, builds one boolean mask (causal at
each sequence's offset, plus context padding) and calls `scaled_dot_product_attention` once. GQA is
folded into the query axis: the query heads that share a KV head become extra query rows, so K/V are
never repeated and a decode is a [group, kv_len] problem per KV head. A group of whole prompts of one
length (no cached context, no padding) uses `is_causal` instead of a mask, which lets SDPA skip the
masked half. Decodes get their own lean path: a [S, Hkv, group, D] query against the gathered
context with a [S, 1, 1, L] mask, read and written as a slice of the flat batch when the decode
tokens are back to back (the executor puts them so).

Everything derived from the step's metadata (the groups, the blocks to gather, the padding to zero,
the query rows, the masks) is computed when the plan is made; `attend` then only gathers, attends
and scatters, so one plan serves every layer of a step.

The gathered K/V land in a per-thread workspace that is reused across calls (and grows to the
largest batch seen): a fresh allocation of that size costs more in page faults than the gather.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .attention_groups import attend_one_by_one, length_buckets
from .cpu_native import NativeDecode, decode_kernel
from .cpu_native import supports as supports_native


class _Workspace(threading.local):
    """Per-thread scratch buffers for gathered K/V, one per (device, dtype), grown on demand."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self.buffers.get((device, dtype))
        if buf is None or buf.numel() < numel:
            # A normal tensor, even when first needed under inference_mode: an inference tensor
            # could not be written by a later call made outside it.
            with torch.inference_mode(False):
                buf = torch.empty(numel, dtype=dtype, device=device)
            self.buffers[(device, dtype)] = buf
        return buf[:numel]


_workspace = _Workspace()


@dataclass(slots=True)
class _GroupPlan:
    """The index tensors of one group of sequences (decodes, or the rest), built once per step."""

    decode: bool  # every q_len is 1
    num_seqs: int
    max_q_len: int
    kv_len: int  # padded context length, a whole number of blocks
    block_ids: torch.Tensor  # [S * B] int64, block of each gathered block (padding -> block 0)
    padded_rows: torch.Tensor | None  # rows of the gathered [S * L] past each context, zeroed before use
    token_slice: slice | None  # decode tokens back to back in `query`: a view, no index needed
    token_index: torch.Tensor  # decode: [S] token of each sequence; else [n] tokens of the valid rows
    q_index: torch.Tensor | None  # [S, Q] token of each padded query row (not decode)
    q_valid: torch.Tensor | None  # [S, Q] bool (not decode)
    whole_prompts: bool  # whole prompts of one length: is_causal, no mask
    kv_valid: torch.Tensor  # [S, L] bool
    q_pos: torch.Tensor | None  # [S, Q] absolute position of each query row (not decode)
    masks: dict[int, torch.Tensor] = field(default_factory=dict)  # GQA group size -> SDPA mask

    def mask(self, group: int) -> torch.Tensor:
        """The boolean SDPA mask for `group` query heads per KV head, built on first use."""
        mask = self.masks.get(group)
        if mask is None:
            if self.decode:
                mask = self.kv_valid[:, None, None, :]  # [S, 1, 1, L], broadcast over heads
            else:
                kv_pos = torch.arange(self.kv_len, device=self.kv_valid.device)  # [L]
                causal = kv_pos[None, None, :] <= self.q_pos[:, :, None]  # [S, Q, L]
                mask = causal & self.kv_valid[:, None, :]  # [S, Q, L]
                mask = mask[:, None].expand(self.num_seqs, group, self.max_q_len, self.kv_len)
                mask = mask.reshape(self.num_seqs, 1, group * self.max_q_len, self.kv_len)  # row g * Q + i
            self.masks[group] = mask
        return mask


class AttentionPlan:
    """What `paged_attention_torch` derives from a step's metadata (block_table, seq_lens,
    cu_seqlens_q), computed once and reused by every layer of the step: each layer then only
    gathers, attends and scatters. Reads the metadata's values on the host once (a CPU backend)."""

    def __init__(
        self,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        block_size: int,
        native: bool = True,
    ) -> None:
        self.block_size = block_size
        cu = cu_seqlens_q.long()
        q_starts = cu[:-1]  # [S]
        q_lens = cu[1:] - q_starts  # [S]
        is_decode = q_lens == 1  # [S]
        decodes = is_decode.nonzero().squeeze(1)  # [S_decode]
        others = (~is_decode).nonzero().squeeze(1)  # [S_other]
        self._metadata = (block_table, seq_lens, q_starts, q_lens)
        self._decodes = decodes
        # On CPU the decodes go to the native kernel when it is built (see `cpu_native`); the gather
        # groups for them are planned only if a call's tensors turn out not to suit it (`attend`).
        kernel = decode_kernel() if native and decodes.numel() and block_table.device.type == "cpu" else None
        self.native: NativeDecode | None = None
        if kernel is not None:
            self.native = NativeDecode(
                kernel,
                block_table.index_select(0, decodes).to(torch.int32).contiguous(),
                seq_lens.index_select(0, decodes).to(torch.int32).contiguous(),
                q_starts.index_select(0, decodes).contiguous(),
            )
        self._decode_groups: list[_GroupPlan] | None = None
        # Prefills (and chunks) of very different lengths are attended one by one: padded to the
        # longest, SDPA would do (and mask) far more work than their causal triangles need.
        self.other_groups: list[_GroupPlan] = []
        self.each: list[_OwnPlan] = []
        if others.numel():
            if attend_one_by_one(q_lens.index_select(0, others), seq_lens.index_select(0, others)):
                self.each = self._plan_each(others)
            else:
                self.other_groups = [self._plan(False, others)]

    def _plan(self, decode: bool, seqs: torch.Tensor) -> _GroupPlan:
        block_table, seq_lens, q_starts, q_lens = self._metadata
        return self._plan_group(
            decode,
            block_table.index_select(0, seqs),
            seq_lens.index_select(0, seqs).long(),
            q_starts.index_select(0, seqs),
            q_lens.index_select(0, seqs),
        )

    def _plan_each(self, seqs: torch.Tensor) -> list[_OwnPlan]:
        block_table, seq_lens, q_starts, q_lens = self._metadata
        plans = []
        for i in seqs.tolist():
            seq_len, q_len, q_start = int(seq_lens[i]), int(q_lens[i]), int(q_starts[i])
            blocks = block_table[i, : -(-seq_len // self.block_size)].long()
            mask = None
            if q_len != seq_len:  # after cached context: query j sees positions <= seq_len - q_len + j
                kv_pos = torch.arange(seq_len, device=seq_lens.device)
                q_pos = torch.arange(seq_len - q_len, seq_len, device=seq_lens.device)
                mask = kv_pos[None, :] <= q_pos[:, None]  # [q_len, seq_len]
            plans.append(_OwnPlan(q_start, q_len, seq_len, blocks, mask))
        return plans

    @property
    def decode_groups(self) -> list[_GroupPlan]:
        """The gather + SDPA groups of the decodes (length buckets), planned on first use."""
        if self._decode_groups is None:
            seq_lens = self._metadata[1]
            buckets = length_buckets(self._decodes, seq_lens.index_select(0, self._decodes))
            self._decode_groups = [self._plan(True, bucket) for bucket in buckets]
        return self._decode_groups

    @property
    def groups(self) -> list[_GroupPlan]:
        """Every gather + SDPA group: the decodes' buckets, then the rest."""
        return self.decode_groups + self.other_groups

    def _plan_group(
        self,
        decode: bool,
        block_table: torch.Tensor,  # [S, max_blocks]
        seq_lens: torch.Tensor,  # [S] int64
        q_starts: torch.Tensor,  # [S] int64
        q_lens: torch.Tensor,  # [S] int64, all >= 1
    ) -> _GroupPlan:
        device = seq_lens.device
        block_size = self.block_size
        num_seqs = seq_lens.size(0)
        max_q_len = int(q_lens.max())
        num_kv_blocks = -(-int(seq_lens.max()) // block_size)
        kv_len = num_kv_blocks * block_size
        # Entries past a sequence's context may be padding (0, -1, anything): gathered as block 0 and,
        # like every slot past the context, zeroed before use, because unwritten slots may hold NaN
        # and a masked 0 * NaN would still leak through.
        block_starts = torch.arange(num_kv_blocks, device=device) * block_size  # [B]
        block_used = block_starts[None, :] < seq_lens[:, None]  # [S, B]
        block_ids = torch.where(block_used, block_table[:, :num_kv_blocks].long(), 0).flatten()  # [S * B]
        kv_pos = torch.arange(kv_len, device=device)  # [L]
        kv_valid = kv_pos[None, :] < seq_lens[:, None]  # [S, L]
        # Whole prompts of one length: plain top-left causal, nothing padded, nothing to zero.
        whole_prompts = not decode and bool(((q_lens == max_q_len) & (seq_lens == max_q_len)).all())
        padded = None if whole_prompts else (~kv_valid).flatten().nonzero().squeeze(1)  # rows of [S * L]
        if padded is not None and padded.numel() == 0:
            padded = None
        if decode:
            first = int(q_starts[0])
            contiguous = bool((q_starts == torch.arange(first, first + num_seqs, device=device)).all())
            return _GroupPlan(
                decode=True,
                num_seqs=num_seqs,
                max_q_len=1,
                kv_len=kv_len,
                block_ids=block_ids,
                padded_rows=padded,
                token_slice=slice(first, first + num_seqs) if contiguous else None,
                token_index=q_starts,
                q_index=None,
                q_valid=None,
                whole_prompts=False,
                kv_valid=kv_valid,
                q_pos=None,
            )
        q_local = torch.arange(max_q_len, device=device)  # [Q]
        q_valid = q_local[None, :] < q_lens[:, None]  # [S, Q]
        q_index = torch.where(q_valid, q_starts[:, None] + q_local[None, :], 0)  # [S, Q] token of each row
        return _GroupPlan(
            decode=False,
            num_seqs=num_seqs,
            max_q_len=max_q_len,
            kv_len=kv_len,
            block_ids=block_ids,
            padded_rows=padded,
            token_slice=None,
            token_index=q_index[q_valid],
            q_index=q_index,
            q_valid=q_valid,
            whole_prompts=whole_prompts,
            kv_valid=kv_valid,
            # Query i sits at absolute position seq_len - q_len + i and sees positions up to it. Padded
            # query rows (i >= q_len) see the whole context, so no row is fully masked (no NaN).
            q_pos=(seq_lens - q_lens)[:, None] + q_local[None, :],
        )

    def attend(
        self,
        query: torch.Tensor,  # [T, H, D]
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
        scale: float,
        out: torch.Tensor,  # [T, H, D]
    ) -> None:
        """Writes every planned sequence's attention output into `out` at its tokens."""
        if self.native is not None and supports_native(query, k_cache, v_cache, out):
            self.native.attend(query, k_cache, v_cache, scale, out)
        else:
            for group in self.decode_groups:
                _attend(group, query, k_cache, v_cache, scale, out)
        for group in self.other_groups:
            _attend(group, query, k_cache, v_cache, scale, out)
        for own in self.each:
            _attend_own(own, query, k_cache, v_cache, scale, out)


@dataclass(slots=True)
class _OwnPlan:
    """A prefill or prefill chunk attended on its own, without padding."""

    q_start: int  # its first token in the flat batch
    q_len: int
    seq_len: int  # context including its new tokens
    block_ids: torch.Tensor  # [ceil(seq_len / block_size)] int64
    mask: torch.Tensor | None  # [q_len, seq_len] bool after cached context; None: a whole prompt


def _attend_own(
    plan: _OwnPlan,
    query: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    scale: float,
    out: torch.Tensor,  # [T, H, D]
) -> None:
    _, _, num_kv_heads, head_dim = k_cache.shape
    # Only the context's own slots: the last block's unwritten tail (maybe NaN) is cut off.
    k = k_cache.index_select(0, plan.block_ids).view(-1, num_kv_heads, head_dim)[: plan.seq_len]
    v = v_cache.index_select(0, plan.block_ids).view(-1, num_kv_heads, head_dim)[: plan.seq_len]
    rows = slice(plan.q_start, plan.q_start + plan.q_len)
    q = query[rows]  # [Q, H, D]
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        attn_mask=plan.mask,
        is_causal=plan.mask is None,
        scale=scale,
        enable_gqa=q.size(1) != num_kv_heads,
    )  # [1, H, Q, D]
    out[rows] = o[0].transpose(0, 1)


def _gather_kv(
    plan: _GroupPlan, k_cache: torch.Tensor, v_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the group's contexts, [S, L, Hkv, D] each, in the reused workspace."""
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    kv_numel = plan.num_seqs * plan.kv_len * num_kv_heads * head_dim
    buf = _workspace.get(2 * kv_numel, k_cache.dtype, k_cache.device)
    k = torch.index_select(k_cache, 0, plan.block_ids, out=buf[:kv_numel].view(-1, *k_cache.shape[1:]))
    v = torch.index_select(v_cache, 0, plan.block_ids, out=buf[kv_numel:].view(-1, *v_cache.shape[1:]))
    if plan.padded_rows is not None:
        k.view(-1, num_kv_heads, head_dim).index_fill_(0, plan.padded_rows, 0)
        v.view(-1, num_kv_heads, head_dim).index_fill_(0, plan.padded_rows, 0)
    shape = (plan.num_seqs, plan.kv_len, num_kv_heads, head_dim)
    return k.view(shape), v.view(shape)  # [S, L, Hkv, D]


def _attend(
    plan: _GroupPlan,
    query: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    scale: float,
    out: torch.Tensor,  # [T, H, D], written at the group's tokens only
) -> None:
    num_seqs, max_q_len = plan.num_seqs, plan.max_q_len
    _, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.size(2)
    group = num_heads // num_kv_heads
    k, v = _gather_kv(plan, k_cache, v_cache)  # [S, L, Hkv, D] each

    if plan.decode:
        # One query row per sequence; the heads sharing a KV head become its `group` rows.
        q = query[plan.token_slice] if plan.token_slice is not None else query[plan.token_index]  # [S, H, D]
        o = F.scaled_dot_product_attention(
            q.view(num_seqs, num_kv_heads, group, head_dim),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=plan.mask(group),
            scale=scale,
        )  # [S, Hkv, group, D]
        o = o.view(num_seqs, num_heads, head_dim)
        if plan.token_slice is not None:
            out[plan.token_slice] = o
        else:
            out.index_copy_(0, plan.token_index, o)
        return

    q = query[plan.q_index]  # [S, Q, H, D]
    if plan.whole_prompts:
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k[:, :max_q_len].transpose(1, 2),
            v[:, :max_q_len].transpose(1, 2),
            is_causal=True,
            scale=scale,
            enable_gqa=group > 1,
        )  # [S, H, Q, D]
        o = o.transpose(1, 2)  # [S, Q, H, D]
    else:
        # Fold the query heads of each KV head into rows: [S, Hkv, group * Q, D], row = g * Q + i.
        q = q.view(num_seqs, max_q_len, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
        q = q.reshape(num_seqs, num_kv_heads, group * max_q_len, head_dim)
        o = F.scaled_dot_product_attention(
            q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=plan.mask(group), scale=scale
        )  # [S, Hkv, group * Q, D]
        o = o.view(num_seqs, num_kv_heads, group, max_q_len, head_dim).permute(0, 3, 1, 2, 4)
        o = o.reshape(num_seqs, max_q_len, num_heads, head_dim)  # [S, Q, H, D]
    out[plan.token_index] = o[plan.q_valid]
