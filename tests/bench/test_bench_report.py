"""The suite's report writer: tables, goal verdicts and plots from fixed results."""

from __future__ import annotations

from pagedserve.bench import doc_sections, hostile_bench, sharing_report
from pagedserve.bench.accounting import AccountingRun, Capacity, SharingRow
from pagedserve.bench.loadgen import LoadResult
from pagedserve.bench.metrics import KVSample, RequestRecord
from pagedserve.bench.peers import PeerResult
from pagedserve.bench.report import table
from pagedserve.bench.suite import QUICK
from pagedserve.bench.suite_report import write_report


def _load(token_gap: float) -> LoadResult:
    """Two requests of 10 output tokens, one token every `token_gap` seconds from t = 0.1."""
    records = []
    for i in range(2):
        times = [0.1 + token_gap * k for k in range(10)]
        records.append(RequestRecord(f"r{i}", 0.0, 5, 10, times, [1] * 10, finished=times[-1]))
    samples = [KVSample(0.05, 4, 8, 2, 0, 0.97), KVSample(0.5, 6, 8, 2, 0, 0.95)]
    return LoadResult(records, samples, None, None)


def test_write_report(tmp_path) -> None:
    docs = tmp_path / "docs" / "BENCHMARKS.md"
    sizes = QUICK
    shipped, contiguous = _load(0.01), _load(0.02)  # 20 tokens in 0.19 s and in 0.28 s
    by_rate = [_load(0.01) for _ in sizes.rates]
    peers = [
        PeerResult("transformers static batching (batch 8)", 1.0, 10, 40),
        PeerResult("transformers continuous batching (generate_batch manager, paged)", float("nan"), 0, 0,
                   "RuntimeError: no"),
    ]  # fmt: skip
    run = AccountingRun(
        steps=10, peak_running=12, peak_blocks_used=8, mean_kv_utilization=0.97, preemptions=1
    )
    cap = Capacity(8, 16, 32, 4, run, run._replace(peak_running=4))
    share = [SharingRow("n=4", 10, 20, "x")]
    results = {
        "mode": "quick",
        "wall_s": 12.0,
        "machine": {"cpu_count": 2, "cpu": "x86_64", "gpu": "none", "python": "3.11", "torch": "2",
                    "torch_threads": 2, "load_average_at_start": 1.0},
        "sizes": {"prompt_median": 64, "output_median": 64},
        "contiguous_max_num_seqs": 4,
        "control_plane": [{"batch": b, "p50_ms": 0.5, "p90_ms": 0.6, "cpu_ms": 0.4, "round_trips": 1.0,
                           "exposed_p50_ms": 0.2, "exposed_p90_ms": 0.25}
                          for b in (1, 16, 64, 256)],
    }  # fmt: skip
    write_report(docs, results, peers, contiguous, shipped, by_rate, cap, share, sizes)
    text = docs.read_text()
    # shipped: 20 tokens over 0.19 s = 105.3 tok/s; static peer 40 tok/s -> 2.63x
    assert "| output tok/s vs transformers static batching | ≥ 2× | 2.63× | met |" in text
    assert "| output tok/s vs transformers continuous batching | ≥ 1.3× | n/a× | n/a |" in text
    assert "RuntimeError: no" in text
    assert "| capacity vs contiguous reservation | ≥ 3× | 3.00× | met |" in text
    assert "| control plane on the critical path, p50 at batch 256 | ≤ 0.3 ms | 0.200 ms | met |" in text
    assert "| 256 | 0.200 | 0.250 | 0.500 | 0.400 | 1.00 |" in text
    assert "| KV utilization (live stack, mean of Stats samples) | ≥ 96% | 96.0% | met |" in text
    assert "pagedserve bench --suite --quick" in text
    for name in ("bench_throughput.png", "bench_kv_utilization.png", "bench_latency_vs_rate.png"):
        assert (docs.parent / name).stat().st_size > 1000
    # the sharing and hostile benches' sections survive a regeneration, the sharing one in its place
    mine = f"{sharing_report.BEGIN}\n## Sharing within a request\nfigures\n{sharing_report.END}"
    hostile = f"{hostile_bench.BEGIN}\nattack\n{hostile_bench.END}"
    begin, end = doc_sections.markers("swap")
    swap = f"{begin}\n## Swap vs recompute\nfigures\n{end}"
    begin, end = doc_sections.markers("gpu")
    gpu = f"{begin}\n## GPU\nfigures by hand\n{end}"
    docs.write_text(
        sharing_report.replace_section(text, mine) + "\n" + swap + "\n\n" + hostile + "\n\n" + gpu + "\n"
    )
    write_report(docs, results, peers, contiguous, shipped, by_rate, cap, share, sizes)
    again = docs.read_text()
    assert again.index("## (c) Sharing") < again.index(mine) < again.index("## (d)")
    assert again.count(sharing_report.BEGIN) == 1 and hostile in again and swap in again and gpu in again


def test_table() -> None:
    assert table(["a", "b"], [[1, 2]]) == "| a | b |\n| --- | ---: |\n| 1 | 2 |"
