"""`pagedserve bench --launch` end to end: a real stack (`pagedserve up`: Redis and the four
services as processes) driven through the gRPC SDK with a handful of tiny requests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

PAGEDSERVE = (sys.executable, "-m", "pagedserve.cli")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.mark.timeout(240)
def test_bench_launch_smoke(tmp_path) -> None:
    out_json, out_md = tmp_path / "run.json", tmp_path / "run.md"
    t0 = time.monotonic()
    proc = subprocess.run(
        [*PAGEDSERVE, "bench", "--launch", "--workload", "shared-prefix", "--num-requests", "6",
         "--system-len", "32", "--prompt-len", "8", "--output-len", "8", "--rate", "20",
         "--max-model-len", "128", "--num-kv-blocks", "64", "--no-progress",
         "--output-json", str(out_json), "--output-md", str(out_md)],
        env=ENV, capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    assert elapsed < 90, f"the smoke run took {elapsed:.0f}s"

    record = json.loads(out_json.read_text())
    summary = record["summary"]
    assert summary["num_requests"] == 6 and summary["num_failed"] == 0
    # ignore_eos and max_tokens = output length: exactly 8 tokens each
    assert summary["output_tokens"] == 6 * 8
    assert summary["prompt_tokens"] == 6 * 40
    assert all(r["output_tokens"] == 8 and not r["error"] for r in record["requests"])
    assert all(0 < r["ttft"] <= r["finished"] - r["sent"] for r in record["requests"])
    assert all(r["tpot"] > 0 for r in record["requests"])
    assert summary["output_throughput"] > 0 and summary["ttft"]["p50"] > 0
    # the Stats poller saw the pool: 64 blocks, and some used while requests ran
    samples = record["kv_samples"]
    assert samples and all(s["blocks_total"] == 64 for s in samples)
    assert summary["peak_blocks_used"] > 0 and 0 < summary["kv_utilization"] <= 1
    assert record["preemptions"] == 0
    assert 0 <= record["prefix_hit_rate"] <= 1
    md = out_md.read_text()
    assert "| TTFT |" in md and "output tok/s" in md
    assert "| TTFT |" in proc.stdout


@pytest.mark.timeout(240)
def test_kv_figures_from_gateway_metrics() -> None:
    """Without the scheduler's address the poller reads the gateway's /metrics instead."""
    import asyncio

    from pagedserve.bench.loadgen import run_load
    from pagedserve.bench.stack import LaunchedStack, StackConfig
    from pagedserve.bench.workload import fixed_lengths
    from pagedserve.common.models import default_model

    # outputs long enough that the 50 ms poller sees the requests' blocks (12 tokens could all be
    # generated between two polls)
    requests = fixed_lengths(4, vocab_size=4096, prompt_len=24, output_len=96, seed=5)
    with LaunchedStack(StackConfig(default_model(), num_kv_blocks=48, max_model_len=128)) as stack:
        result = asyncio.run(
            run_load(stack.gateway_address, requests, metrics_url=f"{stack.http_url}/metrics", progress=False)
        )
    assert [r.output_tokens for r in result.records] == [96] * 4
    assert result.samples and all(s.blocks_total == 48 for s in result.samples)
    assert max(s.blocks_used for s in result.samples) > 0
    assert result.before is not None and result.preemptions == 0


def test_parse_metrics() -> None:
    from pagedserve.bench.loadgen import parse_metrics

    text = (
        "# HELP pagedserve_kv_blocks_used KV blocks.\n# TYPE pagedserve_kv_blocks_used gauge\n"
        "pagedserve_kv_blocks_used 12.0\npagedserve_preemptions_total 3.0\n"
        'pagedserve_time_to_first_token_seconds_bucket{le="0.005"} 1.0\n'
    )
    assert parse_metrics(text) == {"pagedserve_kv_blocks_used": 12.0, "pagedserve_preemptions_total": 3.0}
