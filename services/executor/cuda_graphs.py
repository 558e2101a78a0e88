"""Decode steps replayed from CUDA graphs (on CUDA, with the Triton kernels; `--enforce-eager` off).

A decode step — every sequence computes one token and samples after it — is the same sequence
of kernel launches for a given batch size, whatever the contexts: the Triton kernels read the
block tables, context lengths and slots from device memory, and their grids depend only on the
number of tokens and sequences. So the executor captures one graph per batch size in
`batch_sizes_for(...)` at start-up and, for each decode step, copies the step's inputs into
persistent buffers padded up to the next captured size and replays that graph: one launch
instead of a few hundred, and no Python in the model's forward.

Padding rows compute garbage that nobody reads: slot -1 (no KV write), context length 1
through block 0, and their logits rows are dropped. The inputs are staged in pinned host
memory and go to the device in one asynchronous copy per tensor. Steps that do not fit (a
prefill, a chunk, a batch above the largest size, a context longer than the buffers' block
table) run eagerly as before. `DecodeGraphs(..., capture=False)` runs the same padded buffers
eagerly: how the padding is tested where there is no GPU.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from pagedserve.common.sizes import cdiv
from pagedserve.executor.inputs import ScheduledSeq, StepInputs
from pagedserve.kernels.backends import splitting_decode_contexts

if TYPE_CHECKING:
    from pagedserve.executor.kv_pool import KVPool
    from pagedserve.executor.model_runner import ModelRunner

log = logging.getLogger(__name__)

MAX_GRAPH_BATCH = 256


def batch_sizes_for(max_batch: int) -> list[int]:
    """The captured batch sizes: 1, 2, 4, 8, then every multiple of 8 up to `max_batch` (at
    most 256) — a padded step wastes at most 7 rows past 8."""
    top = max(1, min(max_batch, MAX_GRAPH_BATCH))
    sizes = [b for b in (1, 2, 4) if b < top] + list(range(8, top + 1, 8))
    if not sizes or sizes[-1] < top:
        sizes.append(top)
    return sizes


def is_decode(seqs: list[ScheduledSeq]) -> bool:
    return bool(seqs) and all(s.num_tokens == 1 and s.sample for s in seqs)


class DecodeBuffers:
    """Persistent inputs of a decode step of up to `max_batch` sequences, on the device, with
    pinned host staging copies."""

    def __init__(self, max_batch: int, max_blocks_per_seq: int, device: torch.device) -> None:
        self.max_batch = max_batch
        self.max_blocks = max_blocks_per_seq
        self.device = device
        pin = device.type == "cuda"

        def host(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, pin_memory=pin)

        self.host_ids = host(max_batch, dtype=torch.int64)
        self.host_positions = host(max_batch, dtype=torch.int64)
        self.host_slots = host(max_batch, dtype=torch.int64)
        self.host_table = host(max_batch, max_blocks_per_seq, dtype=torch.int32)
        self.host_lens = host(max_batch, dtype=torch.int32)
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=device)  # [B]
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)  # [B]
        self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.int64, device=device)  # [B]
        self.block_table = torch.zeros(max_batch, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=device)  # [B]
        self.cu_seqlens_q = torch.arange(max_batch + 1, dtype=torch.int32, device=device)  # [B + 1]
        self.sample_indices = torch.arange(max_batch, dtype=torch.int64, device=device)  # [B]

    def fits(self, seqs: list[ScheduledSeq], block_size: int) -> bool:
        return len(seqs) <= self.max_batch and all(
            cdiv(s.start + 1, block_size) <= self.max_blocks for s in seqs
        )

    def fill(self, seqs: list[ScheduledSeq], batch: int, block_size: int) -> None:
        """Write a decode step of len(seqs) <= batch sequences, padded to `batch` rows."""
        n = len(seqs)
        ids, positions, slots, lens, rows = [], [], [], [], []
        for s in seqs:
            ids.append(s.token_ids[s.start])
            positions.append(s.start)
            slots.append(s.block_ids[s.start // block_size] * block_size + s.start % block_size)
            lens.append(s.start + 1)
            rows.append(s.block_ids[: cdiv(s.start + 1, block_size)])
        table = self.host_table[:batch]
        table.zero_()
        if rows:  # one host tensor for the whole table, not one per row
            width = max(map(len, rows))
            flat = [b for row in rows for b in (*row, *[0] * (width - len(row)))]
            table[:n, :width] = torch.tensor(flat, dtype=torch.int32).view(n, width)
        pad = batch - n
        self.host_ids[:batch] = torch.tensor(ids + [0] * pad)
        self.host_positions[:batch] = torch.tensor(positions + [0] * pad)
        self.host_slots[:batch] = torch.tensor(slots + [-1] * pad)  # padding writes no KV
        self.host_lens[:batch] = torch.tensor(lens + [1] * pad, dtype=torch.int32)  # ... and reads block 0
        for dst, src in (
            (self.input_ids, self.host_ids),
            (self.positions, self.host_positions),
            (self.slot_mapping, self.host_slots),
            (self.block_table, self.host_table),
            (self.seq_lens, self.host_lens),
        ):
            dst[:batch].copy_(src[:batch], non_blocking=True)

    def inputs(self, batch: int) -> StepInputs:
        """Views of the first `batch` rows (the same storage every step: what a graph captured)."""
        return StepInputs(
            input_ids=self.input_ids[:batch],
            positions=self.positions[:batch],
            slot_mapping=self.slot_mapping[:batch],
            block_table=self.block_table[:batch],
            seq_lens=self.seq_lens[:batch],
            cu_seqlens_q=self.cu_seqlens_q[: batch + 1],
            sample_indices=self.sample_indices[:batch],
        )


class DecodeGraphs:
    """One CUDA graph per captured batch size, replayed for decode steps that fit."""

    def __init__(
        self, runner: ModelRunner, pool: KVPool, max_batch: int, max_model_len: int, *, capture: bool = True
    ) -> None:
        self.runner = runner
        self.pool = pool
        self.block_size = pool.block_size
        self.sizes = batch_sizes_for(max_batch)
        self.buffers = DecodeBuffers(self.sizes[-1], cdiv(max_model_len, pool.block_size), runner.device)
        self.capture_graphs = capture
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = 0  # decode steps served by a graph (or, without capture, by the padded buffers)

    def capture(self) -> float:
        """Capture every size, largest first (smaller graphs reuse its memory pool); returns seconds."""
        start = time.perf_counter()
        if not self.capture_graphs:
            return 0.0
        mempool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.runner.device)
        with splitting_decode_contexts():  # launch-free in a graph: few sequences split their contexts
            self._capture_all(mempool, stream)
        torch.cuda.synchronize(self.runner.device)
        return time.perf_counter() - start

    def _capture_all(self, mempool, stream: torch.cuda.Stream) -> None:
        for batch in reversed(self.sizes):
            self.buffers.fill([], batch, self.block_size)  # every row padding: no KV is written
            inputs = self.buffers.inputs(batch)
            stream.wait_stream(torch.cuda.current_stream(self.runner.device))
            with torch.cuda.stream(stream):
                self.runner.forward(inputs, self.pool)  # warm-up: Triton compiles, allocator settles
            torch.cuda.current_stream(self.runner.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=mempool):
                logits = self.runner.forward(inputs, self.pool)  # [batch, V], a static output
            self.graphs[batch] = (graph, logits)

    def run(self, seqs: list[ScheduledSeq]) -> torch.Tensor | None:
        """Logits [len(seqs), V] of a decode step from a graph, or None when it does not fit one."""
        if not is_decode(seqs) or not self.buffers.fits(seqs, self.block_size):
            return None
        batch = next(b for b in self.sizes if b >= len(seqs))
        self.buffers.fill(seqs, batch, self.block_size)
        self.replays += 1
        if not self.capture_graphs:
            return self.runner.forward(self.buffers.inputs(batch), self.pool)[: len(seqs)]
        graph, logits = self.graphs[batch]
        graph.replay()
        return logits[: len(seqs)].clone()
