"""Native CPU kernels, built at run time with the machine's C compiler and called through ctypes.

The torch backend gathers each decode sequence's whole context into a padded [S, L, Hkv, D] copy
per layer before `scaled_dot_product_attention`; on CPU that copy, and SDPA's handling of a
one-row query against a masked, strided context, cost more than the attention itself (see
docs/EXECUTOR_BENCH.md, "Decode attention without the gather"). `csrc/paged_decode_cpu.c` reads
K and V straight from the pool through the block table instead. It needs no Python or torch headers, so the build
is one `cc` call of well under a second, done once per machine and source (the shared object is
cached under ~/.cache/pagedserve/kernels, or $PAGEDSERVE_KERNEL_CACHE, keyed by a hash of the source,
the flags, the compiler and the CPU's flags, since it is built with -march=native).
PAGEDSERVE_KERNEL_MARCH names another -march: `x86-64` builds the plain C path that a CPU without
AVX2 (or another architecture) runs, `x86-64-v3` the AVX2 one, so that one machine can check them all.

Optional by design: with no compiler, a failed build, or PAGEDSERVE_NATIVE_KERNELS=0, `decode_kernel()`
returns None and the torch backend keeps its gather + SDPA path (the reason is logged once).

The same shared object holds `csrc/rotary_cpu.c` (rotary embeddings in place, for the lean
forward) and `csrc/core_share.c`: helper threads on cores the executor borrows
(`start_helpers`; `pagedserve up` pins the other services to the last core, which they use only
part of each step). While they run, a decode step's attention items and its linears' column slices
(`kernels.packed_gemm`) are shared with them item by item; each item's arithmetic is the same
whoever runs it, so results do not change. PAGEDSERVE_CORE_HELPERS=0 keeps them off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from pagedserve.common.switches import switched_on

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = tuple(CSRC / name for name in ("paged_decode_cpu.c", "core_share.c", "rotary_cpu.c", "gemm_cpu.c"))
HEADERS = (CSRC / "core_share.h",)
SYMBOL = "pagedserve_decode_attention_f32"
ENV_SWITCH = "PAGEDSERVE_NATIVE_KERNELS"
HELPERS_SWITCH = "PAGEDSERVE_CORE_HELPERS"
MARCH_ENV = "PAGEDSERVE_KERNEL_MARCH"  # the compiler's -march (default: native)
COMMON_FLAGS = ("-O3", "-ffp-contract=fast", "-fPIC", "-shared", "-std=c11", "-pthread")

_lock = threading.Lock()
_loaded: dict[str, object] = {}  # "kernel" -> DecodeKernel | None, once decided


def _cache_dir() -> Path:
    env = os.environ.get("PAGEDSERVE_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pagedserve" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build(compiler: str) -> Path:
    """Compiles the source (with OpenMP when the compiler has it) unless a cached build exists."""
    source = b"\0".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    base = (f"-march={os.environ.get(MARCH_ENV) or 'native'}", *COMMON_FLAGS)
    attempts = [(*base, "-fopenmp"), base]
    errors = []
    for flags in attempts:
        key = hashlib.sha256(
            b"\0".join([source, " ".join(flags).encode(), version.encode(), _cpu_flags().encode()])
        ).hexdigest()[:24]
        target = _cache_dir() / f"paged_decode_cpu-{key}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run(
                [compiler, *flags, *map(str, SOURCES), "-o", str(built), "-lm"],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            if result.returncode == 0:
                os.replace(built, target)  # atomic: processes building at once each land a whole file
                return target
            errors.append(f"{' '.join(flags)}: {result.stderr.strip()[-500:]}")
    raise RuntimeError("; ".join(errors))


class DecodeKernel:
    """`csrc/paged_decode_cpu.c` loaded: decode attention of float32 queries over the pool."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lib = lib = ctypes.CDLL(str(path))
        fn = getattr(lib, SYMBOL)
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [
            ptr, i64, i64,  # query, token stride, head stride
            ptr, ptr,  # k_cache, v_cache
            ptr, i64, i64,  # out, token stride, head stride
            ptr, i64,  # block_table, row stride
            ptr, ptr, i64,  # seq_lens, tokens, num_seqs
            i64, i64, i64, i64,  # num_heads, num_kv_heads, head_dim, block_size
            ctypes.c_float, ctypes.c_int, ptr,  # scale, threads, helper pool
        ]  # fmt: skip
        fn.restype = ctypes.c_int
        self._fn = fn
        rotary = lib.pagedserve_rotary_f32
        rotary.argtypes = [ptr, i64, ptr, ptr, i64, i64, i64]
        rotary.restype = None
        self.rotary = rotary  # x, token stride, cos, sin, T, H, D: see rotary_in_place

    def __call__(
        self,
        query: torch.Tensor,  # [T, H, D] float32, last dim contiguous
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D] float32, contiguous
        v_cache: torch.Tensor,
        out: torch.Tensor,  # [T, H, D] float32, last dim contiguous
        block_table: torch.Tensor,  # [S, >= blocks of the longest context] int32, last dim contiguous
        seq_lens: torch.Tensor,  # [S] int32 contiguous
        tokens: torch.Tensor,  # [S] int64 contiguous: row of each sequence's query in query/out
        scale: float,
        threads: int | None = None,
    ) -> None:
        """Writes out[tokens[s]] for every s; the caller keeps the index tensors alive and valid
        (every block id in range, every token a row of query and out): nothing is checked here.
        On one thread, the work is shared with the core helpers when they run."""
        num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
        threads = threads or torch.get_num_threads()
        pool = helpers() if threads == 1 else None
        if pool is not None:
            threads = pool.workers
        status = self._fn(
            query.data_ptr(), query.stride(0), query.stride(1),
            k_cache.data_ptr(), v_cache.data_ptr(),
            out.data_ptr(), out.stride(0), out.stride(1),
            block_table.data_ptr(), block_table.stride(0),
            seq_lens.data_ptr(), tokens.data_ptr(), seq_lens.numel(),
            query.size(1), num_kv_heads, head_dim, block_size,
            scale, threads, pool.handle if pool is not None else None,
        )  # fmt: skip
        if status:
            raise MemoryError("native decode attention: out of memory for its scratch buffers")


def rotary_in_place(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """x [T, H, D] = x * cos + rotate_half(x) * sin for cos, sin [T, D], in place, with the bits
    of those tensor ops (`csrc/rotary_cpu.c`); False, x untouched, where the library is not built
    or the tensors do not suit it (float32 on CPU; each head's D contiguous, heads adjacent; cos
    and sin contiguous; D even)."""
    kernel = decode_kernel()
    if kernel is None or x.dim() != 3 or cos.dim() != 2:
        return False
    tokens, heads, dim = x.shape
    if not (
        x.device.type == "cpu"
        and all(t.dtype == torch.float32 for t in (x, cos, sin))
        and x.stride(2) == 1
        and x.stride(1) == dim
        and cos.shape == sin.shape == (tokens, dim)
        and cos.is_contiguous()
        and sin.is_contiguous()
        and dim % 2 == 0
    ):
        return False
    kernel.rotary(x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(), tokens, heads, dim)
    return True


def decode_kernel() -> DecodeKernel | None:
    """The native decode kernel, built and loaded on first use; None when it cannot be (logged once)."""
    if not switched_on(ENV_SWITCH):
        return None
    with _lock:
        if "kernel" not in _loaded:
            kernel = None
            compiler = _compiler()
            if compiler is None:
                log.warning(
                    "native CPU decode attention: no C compiler (cc, gcc, clang); using gather + SDPA"
                )
            else:
                try:
                    kernel = DecodeKernel(_build(compiler))
                    log.info("native CPU decode attention: %s", kernel.path)
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    log.warning("native CPU decode attention unavailable (%s); using gather + SDPA", e)
            _loaded["kernel"] = kernel
        return _loaded["kernel"]  # type: ignore[return-value]


class CoreHelpers:
    """Helper threads on borrowed cores (`csrc/core_share.c`), started by `start_helpers`."""

    def __init__(self, kernel: DecodeKernel, cores: tuple[int, ...]) -> None:
        lib = kernel.lib
        i32, ptr = ctypes.c_int, ctypes.c_void_p
        lib.pagedserve_helpers_start.restype = ptr
        lib.pagedserve_helpers_start.argtypes = [i32, ptr, i32]
        lib.pagedserve_helpers_stop.argtypes = [ptr]
        lib.pagedserve_helpers_tids.argtypes = [ptr, ptr, i32]
        lib.pagedserve_sgemm_slices.restype = None
        # pool, compute, m, n, k, a, packed slices, slice starts, number of slices, c
        lib.pagedserve_sgemm_slices.argtypes = [ptr, ptr, i32, i32, i32, ptr, ptr, ptr, ctypes.c_int64, ptr]
        self._lib = lib
        self.sgemm_slices = lib.pagedserve_sgemm_slices
        array = (i32 * len(cores))(*cores)
        self.handle = lib.pagedserve_helpers_start(len(cores), array, len(cores))
        if not self.handle:
            raise OSError("could not start the helper threads")
        self.workers = 1 + len(cores)  # the caller and one helper per core
        tids = (i32 * len(cores))()
        self.tids = tuple(tids[: lib.pagedserve_helpers_tids(self.handle, tids, len(cores))])

    def stop(self) -> None:
        if self.handle:
            self._lib.pagedserve_helpers_stop(self.handle)
            self.handle = None


_helpers: dict[str, CoreHelpers] = {}  # "active" -> the running helpers, while they run


def start_helpers(cores: tuple[int, ...]) -> CoreHelpers | None:
    """One helper thread per core in `cores`, pinned there, for this process's decode attention and
    packed linears; None (logged) where the native kernels are off or unavailable, or
    PAGEDSERVE_CORE_HELPERS=0. Call before the model loads: linears are packed in column slices
    only when helpers run."""
    if not cores or not switched_on(HELPERS_SWITCH):
        return None
    kernel = decode_kernel()
    if kernel is None:
        return None
    stop_helpers()
    try:
        started = CoreHelpers(kernel, cores)
    except OSError as e:
        log.warning("core helpers unavailable: %s", e)
        return None
    _helpers["active"] = started
    return started


def helpers() -> CoreHelpers | None:
    return _helpers.get("active")


def stop_helpers() -> None:
    running = _helpers.pop("active", None)
    if running is not None:
        running.stop()


def supports(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether the native kernel takes these tensors: float32 on CPU, the pool contiguous, each
    query and output row contiguous."""
    return (
        query.device.type == "cpu"
        and all(t.dtype == torch.float32 for t in (query, k_cache, v_cache, out))
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and query.stride(-1) == 1
        and out.stride(-1) == 1
    )


@dataclass(slots=True)
class NativeDecode:
    """The step's decodes for the native CPU kernel: their block-table rows, context lengths and
    query rows, in the kernel's dtypes, made once per step and read by every layer."""

    kernel: DecodeKernel
    block_table: torch.Tensor  # [S, max_blocks] int32
    seq_lens: torch.Tensor  # [S] int32
    tokens: torch.Tensor  # [S] int64

    def attend(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        self.kernel(query, k_cache, v_cache, out, self.block_table, self.seq_lens, self.tokens, scale)
