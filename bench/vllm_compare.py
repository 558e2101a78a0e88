"""pagedserve vs vLLM (`--peers vllm`): the same requests, the same HTTP client, one run.

For each model (the bundled one and a mid-size random Llama) each server is started alone on
the machine, warmed up with 4 short requests, then given the mixed trace and the shared-prefix
trace, every request of a trace sent at once as a streamed greedy `/v1/completions` with
ignore_eos (bench/http_load.py). Both servers get the same max_model_len, max_num_seqs, max_num_batched_tokens, dtype and KV cache memory (1 GiB: vLLM's
VLLM_CPU_KVCACHE_SPACE takes whole GiB; pagedserve gets the number of blocks that fills it),
and the smallest block size each takes: 16 for pagedserve, 32 for vLLM's CPU attention.
The ratio is pagedserve / vLLM; greedy texts are compared request by request.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pagedserve.bench.http_load import HttpLoadResult, run_http_load
from pagedserve.bench.metrics import summarize, summary_dict
from pagedserve.bench.stack import LaunchedStack, StackConfig
from pagedserve.bench.workload import BenchRequest, fixed_lengths, shared_prefix, uniform_lengths

KV_CACHE_GIB = 1
VOCAB = 4096  # the bundled tokenizer's; the mid-size model shares it


@dataclass(frozen=True, slots=True)
class CompareSettings:
    max_model_len: int = 512
    block_size: int = 16  # pagedserve's
    vllm_block_size: int = 32  # vLLM's CPU attention takes multiples of 32 only
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    kv_cache_gib: int = KV_CACHE_GIB


def traces(seed: int = 0) -> dict[str, tuple[str, list[BenchRequest]]]:
    """name -> (description, requests)."""
    return {
        "mixed": (
            "48 requests, prompts 32-256 and outputs 16-192 tokens (uniform), all sent at once",
            uniform_lengths(48, vocab_size=VOCAB, prompt_range=(32, 256), output_range=(16, 192), seed=seed),
        ),
        "shared-prefix": (
            "32 requests, one shared 384-token prefix + 32 own tokens, output 64, all sent at once",
            shared_prefix(32, vocab_size=VOCAB, system_len=384, user_len=32, output_len=64, seed=seed + 1),
        ),
    }


def kv_blocks_for(model_path: str, gib: int, block_size: int) -> int:
    """pagedserve pool blocks that take `gib` GiB of float32 K and V for the model."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    per_block = 2 * config["num_hidden_layers"] * kv_heads * head_dim * block_size * 4
    return gib * 2**30 // per_block


def agreement(a: Sequence, b: Sequence) -> tuple[int, list[int]]:
    """How many requests got the same output (text or token ids) from both servers, and the
    indices that did not."""
    differ = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
    return len(a) - len(differ), differ


def text_differences(indices: Sequence[int], ours: Sequence[str], theirs: Sequence[str]) -> dict[str, int]:
    """Requests with the same tokens but different text, by how the texts differ:
    vllm_prefixed: vLLM's text is pagedserve's with extra text in front;
    replacement_chars: one text is the other followed by U+FFFD only (bytes that are no valid
    UTF-8: pagedserve sends them as U+FFFD, vLLM holds them back); other: anything else."""
    out = {"vllm_prefixed": 0, "replacement_chars": 0, "other": 0}
    for i in indices:
        a, b = ours[i], theirs[i]
        if b.endswith(a) and len(b) > len(a):
            out["vllm_prefixed"] += 1
        elif (a.startswith(b) and set(a[len(b) :]) == {"\ufffd"}) or (
            b.startswith(a) and set(b[len(a) :]) == {"\ufffd"}
        ):
            out["replacement_chars"] += 1
        else:
            out["other"] += 1
    return out


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def run_json(result: HttpLoadResult) -> dict[str, object]:
    summary = summarize(result.records)
    errors = sorted({r.error for r in result.records if r.error})
    return {"summary": summary_dict(summary), "errors": errors[:5]}


def _drive(base_url: str, named: dict[str, tuple[str, list[BenchRequest]]], log: Callable[[str], None],
           label: str) -> dict[str, HttpLoadResult]:  # fmt: skip
    warm = fixed_lengths(4, vocab_size=VOCAB, prompt_len=16, output_len=4, seed=99)
    asyncio.run(run_http_load(base_url, warm))
    out = {}
    for name, (_, requests) in named.items():
        log(f"{label}: {name} trace, {len(requests)} requests")
        out[name] = asyncio.run(run_http_load(base_url, requests))
        s = summarize(out[name].records)
        log(f"{label}: {name}: {s.output_throughput:.0f} output tok/s, TTFT p50 {s.ttft.p50 * 1e3:.0f} ms, "
            f"{s.num_failed} failed")  # fmt: skip
    return out


def _pagedserve(model: str, cs: CompareSettings, named, log) -> dict[str, HttpLoadResult]:
    blocks = kv_blocks_for(model, cs.kv_cache_gib, cs.block_size)
    config = StackConfig(
        model, blocks, cs.block_size, cs.max_model_len, cs.max_num_seqs, cs.max_num_batched_tokens
    )
    log(f"pagedserve: `pagedserve up` on {model}, {blocks} blocks x {cs.block_size}")
    with LaunchedStack(config) as stack:
        return _drive(stack.http_url, named, log, "pagedserve")


def _vllm(venv, model: str, cs: CompareSettings, named, log, log_dir: Path) -> tuple[dict, dict]:
    from pagedserve.bench.vllm_peer import VllmServer, VllmSettings, serve_command, serve_env

    settings = VllmSettings(model, cs.max_model_len, cs.vllm_block_size, cs.max_num_seqs, cs.max_num_batched_tokens,
                            cs.kv_cache_gib)  # fmt: skip
    server = VllmServer(venv, settings, log_dir / f"vllm-{Path(model).name}.log")
    env = serve_env(settings, {}, venv.preload_libs())
    how = {"command": serve_command(venv, settings, server.port), "env": env, "log": str(server.log_path)}
    log(f"vLLM: {' '.join(how['command'])}")
    t0 = time.perf_counter()
    with server:
        how["startup_s"] = round(time.perf_counter() - t0, 1)
        log(f"vLLM: healthy after {how['startup_s']} s")
        return _drive(server.base_url, named, log, "vLLM"), how


def model_row(name: str, path: str, named, ours: dict[str, HttpLoadResult], theirs: dict[str, HttpLoadResult] | None,
              vllm_error: str) -> dict[str, object]:  # fmt: skip
    from transformers import AutoConfig

    from pagedserve.bench.midsize import parameter_count

    row: dict[str, object] = {"name": name, "path": path,
                              "parameters": parameter_count(AutoConfig.from_pretrained(path)), "traces": []}  # fmt: skip
    for trace, (description, requests) in named.items():
        entry: dict[str, object] = {"trace": trace, "description": description, "num_requests": len(requests),
                                    "pagedserve": run_json(ours[trace])}  # fmt: skip
        if theirs is not None:
            entry["vllm"] = run_json(theirs[trace])
            entry["tokens_agree"], token_differ = agreement(ours[trace].token_ids, theirs[trace].token_ids)
            entry["texts_agree"], differ = agreement(ours[trace].texts, theirs[trace].texts)
            entry["same_tokens_other_text"] = text_differences(
                [i for i in differ if i not in token_differ], ours[trace].texts, theirs[trace].texts
            )
            entry["tokens_differ"] = [
                {"index": i, "first_differing_token": _first_difference(ours[trace].token_ids[i],
                                                                        theirs[trace].token_ids[i])}
                for i in token_differ
            ]  # fmt: skip
            entry["texts_differ"] = [
                {"index": i, "pagedserve": ours[trace].texts[i], "vllm": theirs[trace].texts[i]}
                for i in differ[:3]
            ]
        else:
            entry["vllm"] = {"error": vllm_error}
        row["traces"].append(entry)
    return row


def run_vllm_comparison(venv_dir: Path | None, models: Sequence[tuple[str, str]] | None = None,
                        log: Callable[[str], None] = print, seed: int = 0) -> dict[str, object]:  # fmt: skip
    """Install vLLM if needed, then run both servers on both traces for each (name, path) model.
    A vLLM failure is recorded with its error text; pagedserve's rows are still measured."""
    from pagedserve.bench.midsize import build_midsize
    from pagedserve.bench.vllm_peer import VllmFailed, VllmVenv, default_cache_dir
    from pagedserve.common.models import default_model

    cs = CompareSettings()
    named = traces(seed)
    if models is None:
        log("mid-size model: building (or reusing) a random 25.3 M-parameter Llama in the bench cache")
        models = [
            ("bundled tiny-py (3.95 M)", default_model()),
            ("random Llama 25.3 M", str(build_midsize())),
        ]
    log_dir = Path(tempfile.mkdtemp(prefix="pagedserve-vllm-"))
    venv, vllm_error, vllm_version = None, "", ""
    try:
        venv = VllmVenv(venv_dir or default_cache_dir() / "vllm-venv").ensure(log)
        vllm_version = venv.version()
    except VllmFailed as exc:
        vllm_error = str(exc)
        log(f"vLLM: {vllm_error}")
    results: dict[str, object] = {"settings": asdict(cs), "vllm_version": vllm_version, "models": [],
                                  "vllm_runs": []}  # fmt: skip
    for name, path in models:
        ours = _pagedserve(path, cs, named, log)
        theirs, error = None, vllm_error
        if venv is not None:
            try:
                theirs, how = _vllm(venv, path, cs, named, log, log_dir)
                results["vllm_runs"].append({"model": name, **how})
            except VllmFailed as exc:
                error = str(exc)
                log(f"vLLM on {name}: {error}")
        results["models"].append(model_row(name, path, named, ours, theirs, error))
    return results
