"""Markdown tables and PNG plots of bench results."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from pagedserve.bench.metrics import KVSample, RunSummary


def fmt(x: float, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def ms(x: float) -> str:
    return fmt(1e3 * x, 1) if x == x else "n/a"


def table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    align = align or "l" + "r" * (len(header) - 1)
    marks = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def run_table(summary: RunSummary, preemptions: int, prefix_hit_rate: float) -> str:
    """One load run: throughput, latency distributions and KV figures."""
    s = summary
    head = table(
        ["requests", "failed", "duration s", "req/s", "output tok/s", "total tok/s",
         "KV util", "peak running", "preemptions", "prefix hit rate"],
        [[s.num_requests, s.num_failed, fmt(s.duration_s, 2), fmt(s.request_throughput, 2),
          fmt(s.output_throughput), fmt(s.total_throughput), pct(s.kv_utilization),
          s.peak_running, preemptions, pct(prefix_hit_rate)]],
    )  # fmt: skip
    lat = table(
        ["ms", "mean", "p50", "p90", "p99"],
        [[name, ms(d.mean), ms(d.p50), ms(d.p90), ms(d.p99)]
         for name, d in (("TTFT", s.ttft), ("TPOT", s.tpot), ("ITL", s.itl))],
    )  # fmt: skip
    return head + "\n\n" + lat


def pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}%"


def plot_throughput(path: Path, names: Sequence[str], values: Sequence[float], title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    shown = [0.0 if v != v else v for v in values]
    ax.barh(range(len(names)), shown, color="tab:blue")
    ax.set_yticks(range(len(names)), [n if v == v else f"{n} (failed)" for n, v in zip(names, values, strict=True)],
                  fontsize=8)  # fmt: skip
    ax.invert_yaxis()
    ax.set_xlabel("output tokens / s")
    ax.set_title(title, fontsize=9)
    for i, v in enumerate(shown):
        ax.text(v, i, f" {v:.0f}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_kv(path: Path, series: dict[str, Sequence[KVSample]], title: str) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(7, 4.5), sharex=True)
    for name, samples in series.items():
        t = [s.t for s in samples]
        line = axes[0].plot(t, [100 * s.blocks_used / max(s.blocks_total, 1) for s in samples],
                            label=f"{name}: blocks used")[0]  # fmt: skip
        busy = [s for s in samples if s.requests_running]
        axes[0].plot([s.t for s in busy], [100 * s.kv_utilization for s in busy], ":", color=line.get_color(),
                     label=f"{name}: live tokens / allocated slots")  # fmt: skip
        axes[1].plot(t, [s.requests_running for s in samples], label=name)
    axes[0].set_ylabel("KV %")
    axes[1].set_ylabel("requests running")
    axes[1].set_xlabel("seconds since the first request")
    axes[0].legend(fontsize=7)
    axes[0].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency(path: Path, rates: Sequence[float], summaries: Sequence[RunSummary], title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(rates, [1e3 * s.ttft.p50 for s in summaries], "o-", label="TTFT p50")
    ax.plot(rates, [1e3 * s.ttft.p90 for s in summaries], "o--", label="TTFT p90")
    ax.plot(rates, [1e3 * s.tpot.p50 for s in summaries], "s-", label="TPOT p50")
    ax.plot(rates, [1e3 * s.tpot.p90 for s in summaries], "s--", label="TPOT p90")
    ax.set_xlabel("Poisson arrival rate (requests / s)")
    ax.set_ylabel("ms")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
