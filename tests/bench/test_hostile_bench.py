"""The hostile-client benchmark at a tiny size on a real stack (`pagedserve up`): it prints both
waves, the ratio line, and every attack answered as the limits say (the largest asks accepted,
the ones past them refused); its docs section replaces itself and survives a suite rewrite."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from pagedserve.bench.hostile_bench import BEGIN, END, existing_section, replace_section

PAGEDSERVE = (sys.executable, "-m", "pagedserve.cli")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.mark.timeout(240)
def test_hostile_bench_prints_the_ratio(tmp_path) -> None:
    docs = tmp_path / "BENCHMARKS.md"
    docs.write_text(f"# Benchmarks\n\nbefore\n\n{BEGIN}\nold figures\n{END}\n\nafter\n")
    proc = subprocess.run(
        [*PAGEDSERVE, "bench", "--hostile", "--streams", "6", "--output-len", "3", "--attack-tokens", "2",
         "--num-kv-blocks", "512", "--max-model-len", "96", "--attack-lead", "0.2", "--docs", str(docs)],
        env=ENV, capture_output=True, text=True, timeout=220,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{proc.stderr[-4000:]}"
    for wave in ("alone, before:", "with attacker:", "alone, after:"):
        line = rf"^{wave} +TTFT p50 [\d.]+ s, p99 [\d.]+ s, total [\d.]+ s, failed 0$"
        assert re.search(line, out, re.M), out
    ratio = re.search(
        r"^ratio \(with attacker / alone\): TTFT p50 ([\d.]+)x, TTFT p99 ([\d.]+)x, total ([\d.]+)x$",
        out,
        re.M,
    )
    assert ratio and all(float(x) > 0 for x in ratio.groups()), out
    statuses = dict(re.findall(r"^  (.+): \d+, HTTP ([\d,]+), ", out, re.M))
    assert statuses == {
        "n=128 x 64 stops": "200",
        "8192 KiB body": "200",
        "JSON depth 64": "200",
        "95-token prompt": "200",
        "JSON schema 31 levels": "200",
        "n=2^40 (over)": "400",
        "JSON schema 800 levels (over)": "400",
        "Content-Length over (unread)": "413",
    }, out
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    assert "old figures" not in text and ratio.group(0) in text


def test_the_section_is_kept_by_a_rewrite() -> None:
    section = f"{BEGIN}\nfigures\n{END}"
    assert existing_section(f"x\n{section}\ny") == section
    assert existing_section("no section") is None
    assert replace_section("# B\n", section) == f"# B\n\n{section}\n"
