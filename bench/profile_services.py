"""Where each service's CPU goes on the mixed trace, with the gateway's requests on one shared
stream to the scheduler and with a stream each — both in one run, same model, same requests.

    python -m pagedserve.bench.profile_services [--variants shared,per-request,shared+gather]
        [--trace mixed|shared-prefix] [--model M] [--no-py-spy]

For each variant it starts `pagedserve up` with the bundled model, warms it up, sends the
48-request mixed trace (all at once) and reads every service's CPU time (utime + stime from
/proc) before and after: CPU milliseconds per 100 output tokens, per service. When `py-spy` is
installed it also samples each service during the trace and prints the functions with the
most samples of their own (leaf frames). CPU time per token, unlike wall time, barely depends
on what else the machine runs, so the ratio between variants holds on a busy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pagedserve.bench.executor_bench import environment
from pagedserve.bench.http_load import run_http_load
from pagedserve.bench.metrics import summarize
from pagedserve.bench.stack import LaunchedStack, StackConfig
from pagedserve.bench.vllm_compare import VOCAB, traces
from pagedserve.bench.workload import fixed_lengths
from pagedserve.common.models import default_model
from pagedserve.executor.lean_forward import ENV_SWITCH as LEAN_SWITCH
from pagedserve.executor.servicer import INLINE_SWITCH
from pagedserve.kernels.cpu_native import ENV_SWITCH as NATIVE_SWITCH
from pagedserve.kernels.packed_gemm import ENV_SWITCH as PACKED_SWITCH

SERVICES = ("gateway", "tokenizer", "scheduler", "executor")
_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(slots=True)
class VariantResult:
    variant: str
    output_tokens: int
    seconds: float
    cpu: dict[str, float]  # service -> CPU seconds during the trace
    top: dict[str, list[tuple[str, float]]]  # service -> (leaf frame, share of its samples)


def service_pids(launcher_pid: int) -> dict[str, int]:
    """The launcher's children by service name (from their command lines)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid != launcher_pid:
            continue
        words = [w.decode(errors="replace") for w in cmdline]
        for name in SERVICES:
            if name in words:
                found[name] = int(entry.name)
    return found


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def leaf_shares(raw: Path, top: int = 6) -> list[tuple[str, float]]:
    """The leaf frames with the most samples in a py-spy `--format raw` file, with their share."""
    counts: Counter[str] = Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        counts[_label(stack.rsplit(";", 1)[-1])] += int(count)
    total = sum(counts.values()) or 1
    return [(frame, n / total) for frame, n in counts.most_common(top)]


def _label(frame: str) -> str:
    """`func (dir/file.py:123)` -> `func (file.py)`."""
    match = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if match is None:
        return frame
    return f"{match.group(1)} ({match.group(2).rsplit('/', 1)[-1]})"


# A variant is the gateway's scheduler stream, optionally with "+gather": the executor without its
# native CPU decode kernel (PAGEDSERVE_NATIVE_KERNELS=0, see kernels/cpu_native.py), and/or
# "+prefill1": prefill-heavy steps on the executor's ordinary thread count (--prefill-threads 1),
# "+hf": the executor on transformers' own forward (no lean forward, see
# services/executor/lean_forward.py), "+unpacked": its linears on F.linear (kernels/packed_gemm.py),
# "+thread": every step in a worker thread (none on the executor's event loop, see
# services/executor/servicer.py), and/or "+cpuN": the executor's --cpu-threads N.
GATHER_SUFFIX = "+gather"
PREFILL1_SUFFIX = "+prefill1"
SWITCHES = {
    GATHER_SUFFIX[1:]: {NATIVE_SWITCH: "0"},
    "hf": {LEAN_SWITCH: "0"},
    "unpacked": {PACKED_SWITCH: "0"},
    "thread": {INLINE_SWITCH: "0"},
}


def run_variant(
    variant: str, model: str, py_spy: str | None, log_dir: Path, trace: str = "mixed"
) -> VariantResult:
    _, requests = traces()[trace]
    stream, *options = variant.split("+")
    extra = ("--prefill-threads", "1") if PREFILL1_SUFFIX[1:] in options else ()
    for option in options:
        if option.startswith("cpu") and option[3:].isdigit():  # "+cpu2": --cpu-threads 2
            extra += ("--cpu-threads", option[3:])
    config = StackConfig(model, num_kv_blocks=4096, max_model_len=512, max_num_batched_tokens=2048,
                         extra_args=("--scheduler-stream", stream, *extra))  # fmt: skip
    switch = {key: value for option in options for key, value in SWITCHES.get(option, {}).items()}
    with environment(switch), LaunchedStack(config, log_dir=log_dir / variant) as stack:
        assert stack.proc is not None
        asyncio.run(
            run_http_load(stack.http_url, fixed_lengths(4, vocab_size=VOCAB, prompt_len=16, output_len=4))
        )
        pids = service_pids(stack.proc.pid)
        missing = set(SERVICES) - set(pids)
        if missing:
            raise RuntimeError(f"cannot find the pids of {sorted(missing)} under pagedserve up")
        spies = {}
        if py_spy:
            for name, pid in pids.items():
                out = log_dir / f"{variant}-{name}.txt"
                spies[name] = (subprocess.Popen(
                    [py_spy, "record", "--pid", str(pid), "--rate", "100", "--nonblocking",
                     "--format", "raw", "--output", str(out)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                ), out)  # fmt: skip
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        result = asyncio.run(run_http_load(stack.http_url, requests))
        after = {name: cpu_seconds(pid) for name, pid in pids.items()}
        top = {}
        for name, (proc, out) in spies.items():
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
            top[name] = leaf_shares(out) if out.exists() else []
    summary = summarize(result.records)
    if summary.num_failed:
        raise RuntimeError(f"{variant}: {summary.num_failed} requests failed")
    return VariantResult(
        variant,
        summary.output_tokens,
        summary.duration_s,
        {name: after[name] - before[name] for name in SERVICES},
        top,
    )


def report(results: list[VariantResult]) -> str:
    lines = [
        "| variant | output tokens | wall s | "
        + " | ".join(f"{s} CPU ms / 100 tok" for s in SERVICES)
        + " | all |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in SERVICES) + " | ---: |",
    ]
    for r in results:
        per = {s: 1e5 * r.cpu[s] / max(r.output_tokens, 1) for s in SERVICES}
        lines.append(f"| {r.variant} | {r.output_tokens} | {r.seconds:.1f} | "
                     + " | ".join(f"{per[s]:.1f}" for s in SERVICES) + f" | {sum(per.values()):.1f} |")  # fmt: skip
    if len(results) == 2:
        a, b = results
        ratios = []
        for s in SERVICES:
            pa, pb = a.cpu[s] / max(a.output_tokens, 1), b.cpu[s] / max(b.output_tokens, 1)
            ratios.append(f"{s} {pa / pb:.2f}x" if pb else f"{s} -")
        lines.append(f"\nCPU per token, {a.variant} / {b.variant}: " + ", ".join(ratios))
    for r in results:
        for service, frames in r.top.items():
            if frames:
                shown = "; ".join(f"{frame} {share:.0%}" for frame, share in frames)
                lines.append(f"\n{r.variant} {service}: {shown}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variants",
        default="shared,per-request",
        help="comma-separated: shared or per-request (the gateway's scheduler stream), each "
        f"optionally with {GATHER_SUFFIX} (the executor without its native CPU decode kernel) and/or "
        f"{PREFILL1_SUFFIX} (--prefill-threads 1), +hf (no lean forward), +unpacked (F.linear, no packed weights) and/or "
        "+thread (every step in a worker thread) and/or +cpuN (the executor's --cpu-threads N)",
    )
    parser.add_argument("--trace", default="mixed", choices=sorted(traces()))
    parser.add_argument("--model", default=None, help="default: the bundled model")
    parser.add_argument("--no-py-spy", action="store_true", help="CPU times only")
    args = parser.parse_args(argv)
    py_spy = (
        None
        if args.no_py_spy
        else shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    )
    log_dir = Path(tempfile.mkdtemp(prefix="pagedserve-profile-"))
    results = [
        run_variant(v, args.model or default_model(), py_spy, log_dir, args.trace)
        for v in args.variants.split(",")
    ]
    print(report(results))
    print(f"\n(logs and py-spy files in {log_dir})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
