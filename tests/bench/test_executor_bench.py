"""The executor micro-benchmark with transformers as its peer row, and the 1B-class model of the GPU
figures (bench/gpu_device_check.sh runs both there; here they run on the CPU, small)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from pagedserve.bench import executor_bench
from pagedserve.bench.midsize import build_llama_1b, llama_1b_config, parameter_count


def test_transformers_row_beside_the_executor(capsys: pytest.CaptureFixture[str]) -> None:
    assert executor_bench.main(
        ["--backends", "torch", "transformers", "triton-eager", "--batch-sizes", "1", "3",
         "--decode-steps", "2", "--prefill-len", "64"]
    ) == 0  # fmt: skip
    report = capsys.readouterr().out
    assert "transformers: a static batch of 128-token prompts" in report
    rows = {int(m[0]): [float(x) for x in m[1:]] for m in re.findall(r"^\| (\d+) \| ([\d.]+) \| (\d+) \| ([\d.]+) \| (\d+) \|$", report, re.M)}  # fmt: skip
    assert sorted(rows) == [1, 3]
    for batch, (torch_ms, torch_tps, hf_ms, hf_tps) in rows.items():
        assert torch_ms > 0 and hf_ms > 0
        # ms/step is printed to 0.01 ms and tokens/s from the unrounded time: the printed rate must
        # lie within what that rounding allows (at 2 ms a step, 0.005 ms is about 3 tokens/s).
        for ms, tps in ((torch_ms, torch_tps), (hf_ms, hf_tps)):
            assert batch / (ms + 0.005) * 1e3 - 0.5 <= tps <= batch / (ms - 0.005) * 1e3 + 0.5, (
                batch,
                ms,
                tps,
            )
    assert re.search(r"^\| transformers \| \d+ \|$", report, re.M)  # its prefill figure
    assert "triton-eager: not measured on CPU" in report


def test_llama_1b_shape() -> None:
    import torch
    from transformers import LlamaForCausalLM

    assert 1.0e9 <= parameter_count(llama_1b_config()) <= 1.2e9
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_1b_config(num_layers=2))
    assert parameter_count(llama_1b_config(num_layers=2)) == sum(p.numel() for p in model.parameters())


def test_llama_1b_builds_once_in_bfloat16(tmp_path) -> None:
    import json

    out = build_llama_1b(tmp_path / "m", num_layers=1)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["num_hidden_layers"] == 1
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert build_llama_1b(out, num_layers=1) == out  # reused, not rebuilt
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_gpu_check_says_it_needs_a_gpu() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pagedserve.bench.gpu_check"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "these checks need a GPU" in proc.stdout
