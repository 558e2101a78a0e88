"""The vLLM section of docs/BENCHMARKS.md from a fixed results dict, and the pieces it rests on."""

from __future__ import annotations

import json
from pathlib import Path

from pagedserve.bench.http_load import completion_body, parse_sse_line
from pagedserve.bench.midsize import midsize_config, parameter_count
from pagedserve.bench.vllm_compare import agreement, kv_blocks_for, text_differences, traces
from pagedserve.bench.vllm_report import (
    BEGIN,
    END,
    existing_section,
    ratio_rows,
    replace_section,
    write_vllm_section,
)
from pagedserve.bench.workload import BenchRequest
from pagedserve.common.models import default_model


def _run(tok_s: float, ttft_p50: float) -> dict:
    dist = {"mean": ttft_p50, "p50": ttft_p50, "p90": ttft_p50, "p99": 2 * ttft_p50}
    return {"summary": {"output_throughput": tok_s, "ttft": dist, "tpot": {**dist, "p50": 0.05}, "num_failed": 0},
            "errors": []}  # fmt: skip


RESULTS = {
    "settings": {"max_model_len": 512, "block_size": 16, "max_num_seqs": 256, "max_num_batched_tokens": 2048,
                 "kv_cache_gib": 1},
    "vllm_version": "0.32.0",
    "vllm_runs": [{"model": "tiny", "command": ["python", "vllm_launcher.py", "serve", "/m/tiny"],
                   "env": {"VLLM_HOST_IP": "127.0.0.1"}, "startup_s": 61.0, "log": "/tmp/x.log"}],
    "models": [
        {"name": "tiny", "path": "/m/tiny", "parameters": 3_950_000, "traces": [
            {"trace": "mixed", "description": "48 requests", "num_requests": 48, "pagedserve": _run(600.0, 0.2),
             "vllm": _run(1200.0, 0.4), "tokens_agree": 48, "texts_agree": 47,
             "same_tokens_other_text": {"vllm_prefixed": 1, "replacement_chars": 0, "other": 0}},
            {"trace": "shared-prefix", "description": "32 requests", "num_requests": 32,
             "pagedserve": _run(613.0, 0.3), "vllm": {"error": "vllm serve exited with 1:\nboom"}},
        ]},
    ],
}  # fmt: skip


def test_section_from_fixed_results(tmp_path: Path) -> None:
    docs = tmp_path / "BENCHMARKS.md"
    docs.write_text("# Benchmarks\n\nthe suite's text\n")
    write_vllm_section(docs, RESULTS)
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nthe suite's text\n")
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert (
        "| tiny | mixed | 600.0 | 1200.0 | **0.50×** | 200 / 400 | 400 / 800 | 50 / 50 | 48/48 | 47/48 | 0 / 0 |"
        in text
    )
    assert "| tiny | shared-prefix | 613.0 | n/a | **n/a×** |" in text
    assert "vllm serve exited with 1:\nboom" in text
    assert (
        "mixed: 1 request(s) with the same tokens where vLLM's text is pagedserve's with extra text" in text
    )
    assert "VLLM_HOST_IP=127.0.0.1" in text and "healthy after 61 s" in text
    write_vllm_section(docs, RESULTS)  # a second write replaces, never appends
    assert docs.read_text() == text


def test_ratio_rows_and_replace() -> None:
    rows = ratio_rows(RESULTS)
    assert rows[0] == ("tiny", "mixed", 600.0, 1200.0, 0.5)
    assert rows[1][4] != rows[1][4]  # NaN: vLLM did not run
    assert replace_section(f"a\n{BEGIN}\nold\n{END}\nb\n", f"{BEGIN}new{END}") == f"a\n{BEGIN}new{END}\nb\n"
    # the whole suite's writer keeps an existing section: it appends what existing_section found
    kept = existing_section(f"# Benchmarks\n{BEGIN}\nold\n{END}\n")
    assert kept == f"{BEGIN}\nold\n{END}"
    assert replace_section("# new report\n", kept) == f"# new report\n\n{BEGIN}\nold\n{END}\n"
    assert existing_section("# no section\n") is None


def test_midsize_parameter_count() -> None:
    config = midsize_config(4096)
    assert parameter_count(config) == 25_305_600
    assert 25e6 <= parameter_count(config) <= 100e6
    bundled = json.loads((Path(default_model()) / "config.json").read_text())
    assert config.vocab_size == bundled["vocab_size"]


def test_midsize_count_matches_torch() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(small)
    assert parameter_count(small) == sum(p.numel() for p in model.parameters())


def test_traces_and_kv_blocks() -> None:
    named = traces()
    mixed = named["mixed"][1]
    assert len(mixed) == 48
    assert all(32 <= len(r.prompt_token_ids) <= 256 and 16 <= r.output_len <= 192 for r in mixed)
    shared = named["shared-prefix"][1]
    assert len(shared) == 32 and all(len(r.prompt_token_ids) == 416 and r.output_len == 64 for r in shared)
    assert len({tuple(r.prompt_token_ids[:384]) for r in shared}) == 1
    # the bundled model: K and V x 4 layers x 4 KV heads x 32 x 16 tokens x 4 bytes = 64 KiB a block
    assert kv_blocks_for(default_model(), 1, 16) == 16384


def test_client_pieces() -> None:
    body = completion_body("m", BenchRequest([5, 6, 7], 9))
    assert body == {"model": "m", "prompt": [5, 6, 7], "max_tokens": 9, "temperature": 0.0, "ignore_eos": True,
                    "return_token_ids": True,
                    "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    assert parse_sse_line('data: {"choices": []}') == {"choices": []}
    assert parse_sse_line("data: [DONE]") is None and parse_sse_line("") is None
    assert agreement(["a", "b", "c"], ["a", "x", "c"]) == (2, [1])
    ours = ["abc", "ab\ufffd\ufffd", "xyz"]
    theirs = ["PROMPTabc", "ab", "xyw"]
    assert text_differences([0, 1, 2], ours, theirs) == {
        "vllm_prefixed": 1,
        "replacement_chars": 1,
        "other": 1,
    }
