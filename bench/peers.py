"""In-process `transformers` peers on the same model, prompts and output lengths.

- static batching: `model.generate` on padded batches of a fixed size, in trace order, left
  padding, greedy, EOS ignored. A batch runs until its longest request's output length (that
  is static batching's waste); only each request's own output length counts as output tokens.
- continuous batching: transformers' `ContinuousBatchingManager` (what `generate_batch` runs)
  with paged attention, each request added with its own max_new_tokens, EOS disabled.

Both time the generation only (model load and warm-up excluded), like the pagedserve runs
(stack start-up excluded).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Sequence
from typing import NamedTuple

from pagedserve.bench.workload import BenchRequest

PAD_ID = 2  # the bundled model's pad token


class PeerResult(NamedTuple):
    name: str
    duration_s: float
    prompt_tokens: int
    output_tokens: int
    error: str = ""

    @property
    def output_throughput(self) -> float:
        return self.output_tokens / self.duration_s if not self.error else float("nan")

    @property
    def total_throughput(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.duration_s if not self.error else float("nan")

    @property
    def request_throughput(self) -> float:
        return float("nan")


def _load(model_path: str, attn: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn} if attn else {}
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, **kwargs).eval()


def hf_static(model_path: str, requests: Sequence[BenchRequest], batch_size: int) -> PeerResult:
    """Padded batches of `batch_size`, greedy, left padding."""
    import torch

    name = f"transformers static batching (batch {batch_size})"
    try:
        model = _load(model_path)

        def run(batch: Sequence[BenchRequest]) -> None:
            width = max(len(r.prompt_token_ids) for r in batch)
            ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)  # [B, P]
            mask = torch.zeros_like(ids)
            for row, r in enumerate(batch):
                ids[row, width - len(r.prompt_token_ids) :] = torch.tensor(r.prompt_token_ids)
                mask[row, width - len(r.prompt_token_ids) :] = 1
            model.generate(
                ids, attention_mask=mask, max_new_tokens=max(r.output_len for r in batch),
                min_new_tokens=max(r.output_len for r in batch), do_sample=False,
                eos_token_id=None, pad_token_id=PAD_ID,
            )  # fmt: skip

        with torch.no_grad():
            run(requests[: min(2, len(requests))])  # warm-up
            t0 = time.perf_counter()
            for i in range(0, len(requests), batch_size):
                run(requests[i : i + batch_size])
            duration = time.perf_counter() - t0
        return PeerResult(name, duration, _prompt_tokens(requests), _output_tokens(requests))
    except Exception as exc:
        return PeerResult(name, float("nan"), 0, 0, f"{type(exc).__name__}: {exc}")


def hf_continuous(
    model_path: str, requests: Sequence[BenchRequest], *, block_size: int, num_blocks: int,
    max_batch_tokens: int,
) -> PeerResult:  # fmt: skip
    """transformers' continuous batching manager, paged attention, the same KV budget."""
    import torch
    from transformers import ContinuousBatchingConfig, GenerationConfig

    name = "transformers continuous batching (generate_batch manager, paged)"
    try:
        model = _load(model_path)
        if not hasattr(model, "generate_batch"):
            return PeerResult(name, float("nan"), 0, 0, "this transformers has no generate_batch")
        gen = GenerationConfig(
            max_new_tokens=max(r.output_len for r in requests), do_sample=False,
            eos_token_id=-1, pad_token_id=PAD_ID,
        )  # fmt: skip
        cb = ContinuousBatchingConfig(
            page_size=block_size, num_blocks=num_blocks, max_batch_tokens=max_batch_tokens
        )
        with (
            torch.no_grad(),
            model.continuous_batching_context_manager(
                generation_config=gen, continuous_batching_config=cb, warmup=False
            ) as manager,
        ):
            t0 = time.perf_counter()
            ids = [
                manager.add_request(r.prompt_token_ids, request_id=f"peer-{i}", max_new_tokens=r.output_len,
                                    eos_token_id=-1)
                for i, r in enumerate(requests)
            ]  # fmt: skip
            done: dict[str, int] = {}
            while len(done) < len(ids):
                result = manager.get_result(timeout=1.0)
                if result is None:
                    if not manager.is_running():
                        raise RuntimeError(f"generation thread stopped after {len(done)} of {len(ids)}")
                    continue
                if result.is_finished():
                    if result.error:
                        raise RuntimeError(f"request {result.request_id}: {result.error}")
                    done[result.request_id] = len(result.generated_tokens)
            duration = time.perf_counter() - t0
        expected = _output_tokens(requests)
        got = sum(done.values())
        if got != expected:
            return PeerResult(name, duration, 0, 0, f"generated {got} tokens, expected {expected}")
        return PeerResult(name, duration, _prompt_tokens(requests), got)
    except Exception as exc:
        last = traceback.format_exc().strip().splitlines()[-1]
        return PeerResult(name, float("nan"), 0, 0, f"{type(exc).__name__}: {exc} ({last})")


def _prompt_tokens(requests: Sequence[BenchRequest]) -> int:
    return sum(len(r.prompt_token_ids) for r in requests)


def _output_tokens(requests: Sequence[BenchRequest]) -> int:
    return sum(r.output_len for r in requests)
