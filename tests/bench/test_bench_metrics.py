"""The bench's metric computations on a recorded event trace whose answers are worked out by hand."""

from __future__ import annotations

import math

import pytest

from pagedserve.bench.loadgen import LoadResult, StatsSnapshot
from pagedserve.bench.metrics import KVSample, RequestRecord, percentile, summarize

TOL = 1e-9


def trace() -> tuple[list[RequestRecord], list[KVSample]]:
    """Three finished requests and a failed one; four Stats samples (two with a running sequence).

    A: sent 0.0, messages at 0.5 0.6 0.8 1.1 (1 token each)  -> TTFT 0.5, TPOT 0.6/3 = 0.2, ITL 0.1 0.2 0.3
    B: sent 0.2, messages at 0.4 (1 token) and 1.0 (2 tokens) -> TTFT 0.2, TPOT 0.6/2 = 0.3, ITL 0.6
    C: sent 0.3, one message at 0.9 (1 token)                 -> TTFT 0.6, no TPOT, no ITL
    D: failed; counted in num_failed only.
    """
    a = RequestRecord("a", 0.0, 10, 4, [0.5, 0.6, 0.8, 1.1], [1, 1, 1, 1], finished=1.1)
    b = RequestRecord("b", 0.2, 6, 3, [0.4, 1.0], [1, 2], finished=1.2)
    c = RequestRecord("c", 0.3, 4, 1, [0.9], [1], finished=0.9)
    d = RequestRecord("d", 0.1, 50, 9, [0.2], [1], finished=5.0, error="Unavailable: boom")
    samples = [
        KVSample(0.0, 0, 10, 0, 3, 0.0),
        KVSample(0.5, 4, 10, 2, 1, 0.9),
        KVSample(1.0, 6, 10, 3, 0, 0.8),
        KVSample(1.5, 0, 10, 0, 0, 0.0),
    ]
    return [a, b, c, d], samples


def test_per_request_figures() -> None:
    a, b, c, _ = trace()[0]
    assert a.ttft == pytest.approx(0.5, abs=TOL)
    assert a.tpot == pytest.approx(0.2, abs=TOL)
    assert a.itls == pytest.approx([0.1, 0.2, 0.3], abs=TOL)
    assert b.output_tokens == 3
    assert b.ttft == pytest.approx(0.2, abs=TOL)
    assert b.tpot == pytest.approx(0.3, abs=TOL)
    assert b.itls == pytest.approx([0.6], abs=TOL)
    assert c.ttft == pytest.approx(0.6, abs=TOL)
    assert c.tpot is None
    assert c.itls == []
    assert RequestRecord("e", 0.0, 1, 1).ttft is None


def test_percentiles_interpolate_linearly() -> None:
    assert percentile([0.5, 0.2, 0.6], 50) == pytest.approx(0.5, abs=TOL)
    assert percentile([0.5, 0.2, 0.6], 90) == pytest.approx(0.58, abs=TOL)  # rank 1.8
    assert percentile([1, 2, 3, 4], 50) == pytest.approx(2.5, abs=TOL)
    assert percentile([1, 2, 3, 4], 0) == 1
    assert percentile([1, 2, 3, 4], 100) == 4
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_summary() -> None:
    records, samples = trace()
    s = summarize(records, samples)
    assert (s.num_requests, s.num_failed) == (3, 1)
    assert s.duration_s == pytest.approx(1.2, abs=TOL)  # first sent 0.0 .. last finished 1.2
    assert (s.prompt_tokens, s.output_tokens) == (20, 8)
    assert s.request_throughput == pytest.approx(3 / 1.2, abs=TOL)
    assert s.output_throughput == pytest.approx(8 / 1.2, abs=TOL)
    assert s.total_throughput == pytest.approx(28 / 1.2, abs=TOL)
    # TTFT 0.5 0.2 0.6
    assert s.ttft.mean == pytest.approx(1.3 / 3, abs=TOL)
    assert (s.ttft.p50, s.ttft.p90, s.ttft.p99) == pytest.approx((0.5, 0.58, 0.598), abs=TOL)
    # TPOT 0.2 0.3
    assert (s.tpot.mean, s.tpot.p50, s.tpot.p90) == pytest.approx((0.25, 0.25, 0.29), abs=TOL)
    # ITL 0.1 0.2 0.3 0.6
    assert (s.itl.mean, s.itl.p50, s.itl.p90, s.itl.p99) == pytest.approx((0.3, 0.25, 0.51, 0.591), abs=TOL)
    # KV: only the samples with a running sequence count
    assert s.kv_utilization == pytest.approx(0.85, abs=TOL)
    assert (s.peak_blocks_used, s.peak_running) == (6, 3)


def test_summary_without_samples_or_successes() -> None:
    records, _ = trace()
    s = summarize(records[:1])
    assert math.isnan(s.kv_utilization) and s.peak_running == 0
    failed = summarize(records[3:])
    assert failed.num_requests == 0 and failed.num_failed == 1 and math.isnan(failed.output_throughput)


def test_stats_deltas() -> None:
    before = StatsSnapshot(preemptions=3, prefix_hit_tokens=100, prefix_query_tokens=400, blocks_total=64,
                           block_size=16, max_model_len=512)  # fmt: skip
    after = before._replace(preemptions=7, prefix_hit_tokens=160, prefix_query_tokens=640)
    result = LoadResult([], [], before, after)
    assert result.preemptions == 4
    assert result.prefix_hit_rate == pytest.approx(60 / 240, abs=TOL)
    assert math.isnan(LoadResult([], [], before, before).prefix_hit_rate)
    assert LoadResult([], [], None, None).preemptions == 0
