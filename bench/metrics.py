"""Serving metrics from a recorded event trace: per-request timings and the run's summary.

Definitions (all times in seconds, from one monotonic clock):

- TTFT: first output token received - request sent.
- TPOT: (last token received - first token received) / (output tokens - 1); requests with
  one output token have no TPOT.
- ITL (inter-token latency): the gap between consecutive stream messages of a request, one
  value per message after the first; a message that carries k tokens counts once (as vLLM's
  benchmark_serving does).
- Throughput: requests, output tokens and prompt + output tokens over the run's duration
  (first request sent to last request finished).
- KV utilization: mean of the scheduler's `kv_utilization` (live tokens / allocated slots
  after a step) over the samples taken while a sequence was running.
- Percentiles interpolate linearly between the closest ranks (numpy's default).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass(slots=True)
class RequestRecord:
    """What the load generator saw of one request."""

    request_id: str
    sent: float
    prompt_tokens: int
    expected_output_tokens: int
    token_times: list[float] = field(default_factory=list)  # arrival time of each stream message
    token_counts: list[int] = field(default_factory=list)  # tokens in each message (all choices)
    finished: float = 0.0
    error: str = ""

    @property
    def output_tokens(self) -> int:
        return sum(self.token_counts)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.sent if self.token_times else None

    @property
    def tpot(self) -> float | None:
        n = self.output_tokens
        if n < 2 or len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (n - 1)

    @property
    def itls(self) -> list[float]:
        times = self.token_times
        return [b - a for a, b in zip(times, times[1:], strict=False)]


class KVSample(NamedTuple):
    """One poll of the scheduler's Stats."""

    t: float
    blocks_used: int
    blocks_total: int
    requests_running: int
    requests_waiting: int
    kv_utilization: float


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100), linear between closest ranks; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    lo = int(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


class Distribution(NamedTuple):
    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        if not values:
            nan = float("nan")
            return cls(nan, nan, nan, nan)
        return cls(
            statistics.fmean(values), percentile(values, 50), percentile(values, 90), percentile(values, 99)
        )


class RunSummary(NamedTuple):
    num_requests: int
    num_failed: int
    duration_s: float
    request_throughput: float  # requests / s
    output_throughput: float  # output tokens / s
    total_throughput: float  # prompt + output tokens / s
    prompt_tokens: int
    output_tokens: int
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    kv_utilization: float  # mean over samples with a running sequence; NaN without samples
    peak_blocks_used: int
    peak_running: int


def summarize(records: Sequence[RequestRecord], samples: Sequence[KVSample] = ()) -> RunSummary:
    """The run's figures; failed requests count in num_failed and nowhere else."""
    ok = [r for r in records if not r.error]
    if ok:
        start = min(r.sent for r in ok)
        end = max(r.finished for r in ok)
        duration = max(end - start, 1e-9)
    else:
        duration = float("nan")
    prompt = sum(r.prompt_tokens for r in ok)
    output = sum(r.output_tokens for r in ok)
    busy = [s.kv_utilization for s in samples if s.requests_running > 0]
    return RunSummary(
        num_requests=len(ok),
        num_failed=len(records) - len(ok),
        duration_s=duration,
        request_throughput=len(ok) / duration,
        output_throughput=output / duration,
        total_throughput=(prompt + output) / duration,
        prompt_tokens=prompt,
        output_tokens=output,
        ttft=Distribution.of([r.ttft for r in ok if r.ttft is not None]),
        tpot=Distribution.of([r.tpot for r in ok if r.tpot is not None]),
        itl=Distribution.of([gap for r in ok for gap in r.itls]),
        kv_utilization=statistics.fmean(busy) if busy else float("nan"),
        peak_blocks_used=max((s.blocks_used for s in samples), default=0),
        peak_running=max((s.requests_running for s in samples), default=0),
    )


def summary_dict(summary: RunSummary) -> dict[str, object]:
    """A JSON-ready dict (distributions as nested dicts)."""
    out: dict[str, object] = {}
    for name, value in summary._asdict().items():
        out[name] = value._asdict() if isinstance(value, Distribution) else value
    return out
