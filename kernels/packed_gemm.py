"""float32 linears on CPU with the weight packed once, through a packed GEMM: MKL's or our own.

`F.linear` on CPU calls MKL's sgemm, which copies ("packs") the weight into its kernel's tiled layout
on every call. A decode step multiplies a few rows by every weight of the model, so that copy is
a large part of the step: a 25 M-parameter Llama's linears at 32 rows take 22 ms with `F.linear`
and 16 ms with the weights packed once at load (1.2-1.45x from 4 to 512 rows; docs/EXECUTOR_BENCH.md,
"Packed linears"). One or two rows are a matrix-vector product, which F.linear does as fast without
the copy (a few percent faster, measured), so those keep F.linear. MKL exports the API (`cblas_sgemm_pack`,
`cblas_sgemm_compute`) from the libtorch_cpu that torch's x86 wheels ship; it is looked up there.

MKL takes its AVX-512 kernels on Intel CPUs only: on an AVX-512 AMD EPYC its packed GEMM ran at
the speed of F.linear (about 85 GFLOP/s a core at 32 rows). There the native AVX-512 kernel
(`csrc/gemm_cpu.c`, built with the other native kernels) runs at 105-115, and at twice F.linear's
speed for one or two rows, so it takes every row count. At the first packing each is timed on a
decode-sized call and the faster one serves the process (logged); PAGEDSERVE_PACKED_GEMM=mkl or
native forces one. The native kernel uses the calling core only: a call on more than one torch
thread (a prefill step's `--prefill-threads`) goes to oneDNN's linear instead, on a copy of the
weight in oneDNN's blocked layout made at packing (1.13-1.37x F.linear's speed on two threads at
256-2,048 rows of the bundled model's shapes on that EPYC; another copy of the weight in memory;
PAGEDSERVE_ONEDNN_LINEARS=0 keeps F.linear there, as does a torch built without oneDNN).

Two properties matter for serving:
- on one thread, from the GEMM's `min_rows` up (MKL: `MIN_ROWS`; native AVX-512: 1), a row's
  result does not depend on how many rows are multiplied with it (checked up to 64 rows in
  tests/kernels/test_packed_gemm.py); the native kernel keeps it by construction. `F.linear`
  switches kernels with the row count (at 16 rows on an AVX-512 Xeon), and its bits with them.
  MKL's packed kernels keep a
  row's bits on some CPUs and not on others: on an AVX2 EPYC, 5-7 and 9-11 rows summed in another
  order than the same rows among 64, while 4, 8 and 12 or more did not. So at the first packing a
  probe finds the smallest row multiple that keeps every row's bits from 3 to 64 rows (1 on the
  Xeon, 4 on the EPYC), and a call with another row count is padded with zero rows up to it.
- the bits are not always `F.linear`'s: the sums over the inner dimension may be split at other
  places (differences of about 1e-6 at unit scale, tested); greedy outputs stay token-identical to
  transformers in the tests.

While core helpers run (`kernels.cpu_native.start_helpers`), each weight is packed in column
slices instead, and a one-thread call shares the slices with the helpers: each slice is read by
one core only, and a column's sums are the same whichever slice holds it (tested).

The packed copy lives beside the model's own weight (which the rest of the model may still use):
it costs about as much memory again as the packed matrices. Optional by design: with neither GEMM
(another BLAS and no native kernels), for non-float32 weights, or with
PAGEDSERVE_PACKED_LINEARS=0, `packed_linear()` returns None and callers keep `F.linear`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time

import torch
import torch.nn.functional as F

from pagedserve.common.switches import switched_on

from . import cpu_native

log = logging.getLogger(__name__)

ENV_SWITCH = "PAGEDSERVE_PACKED_LINEARS"
ONEDNN_SWITCH = "PAGEDSERVE_ONEDNN_LINEARS"  # calls on several threads beside a one-core GEMM
GEMM_ENV = "PAGEDSERVE_PACKED_GEMM"  # mkl, native, or auto (the default): see _choose

# CBLAS enum values (mkl_cblas.h)
_ROW_MAJOR, _NO_TRANS, _TRANS, _PACKED, _B_MATRIX = 101, 111, 112, 151, 162
# The row count MKL is told when packing: the layout serves any row count at compute time;
# this one gave the best times across 1-512 rows on the models measured.
_PACK_ROWS = 256
MIN_ROWS = 3  # fewer rows go to F.linear
_GRANULES = (1, 2, 4, 8, 16)  # row multiples the probe tries, smallest first
_PROBE_ROWS = 64
# With core helpers: a weight's columns in about two slices per worker (at least this wide, a
# multiple of 16), so that a late helper leaves the caller little to wait for.
MIN_SLICE_COLUMNS = 64


def slice_starts(out_features: int, workers: int) -> list[int]:
    """Where each column slice of a weight with `out_features` columns starts, and the end."""
    if workers <= 1:
        return [0, out_features]
    width = max(MIN_SLICE_COLUMNS, -(-out_features // (2 * workers)))
    width = -(-width // 16) * 16
    return [*range(0, out_features, width), out_features]


_lock = threading.Lock()
_loaded: dict[str, object] = {}  # "gemm" -> Gemm | None, once decided; "granule:<name>" -> int


# cblas_sgemm_compute's: layout, transa, transb, m, n, k, a, lda, b, ldb, beta, c, ldc
_COMPUTE_ARGS = [*[ctypes.c_int] * 6, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_float,
                 ctypes.c_void_p, ctypes.c_int]  # fmt: skip


class Gemm:
    """One packed GEMM: how large a packed weight slice is, how to pack it, and the compute call
    (cblas_sgemm_compute's signature, so core_share.c can share its column slices out).
    `threaded`: whether compute uses torch's threads (MKL's does; the native one runs on the
    calling core only, so a call on more threads goes to F.linear instead)."""

    def __init__(self, name: str, size, pack, compute, min_rows: int, threaded: bool) -> None:
        self.name, self.min_rows, self.threaded = name, min_rows, threaded
        self._size, self._pack, self.compute = size, pack, compute

    def pack(self, weight: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
        """Columns c0 .. c1 of a contiguous [out, in] weight, packed."""
        k = weight.shape[1]
        packed = torch.empty(self._size(c1 - c0, k), dtype=torch.float32)
        self._pack(weight[c0].data_ptr(), c1 - c0, k, packed.data_ptr())
        return packed


def _mkl() -> Gemm | None:
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        lib = ctypes.CDLL(path)
        get_size, pack, compute = lib.cblas_sgemm_pack_get_size, lib.cblas_sgemm_pack, lib.cblas_sgemm_compute
    except (OSError, AttributeError) as e:
        log.info("MKL's packed GEMM unavailable (%s)", e)
        return None
    c_int, c_float, ptr = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    get_size.restype = ctypes.c_size_t
    get_size.argtypes = [c_int, c_int, c_int, c_int]  # identifier, m, n, k
    pack.restype = None
    # layout, identifier, trans, m, n, k, alpha, src, ld, dest
    pack.argtypes = [c_int, c_int, c_int, c_int, c_int, c_int, c_float, ptr, c_int, ptr]
    compute.restype, compute.argtypes = None, _COMPUTE_ARGS
    # MKL's size has room for its widest tiling; only what it writes becomes resident.
    return Gemm(
        "mkl",
        lambda n, k: -(-get_size(_B_MATRIX, _PACK_ROWS, n, k) // 4),
        lambda src, n, k, dst: pack(_ROW_MAJOR, _B_MATRIX, _TRANS, _PACK_ROWS, n, k, 1.0, src, k, dst),
        compute,
        MIN_ROWS,
        threaded=True,
    )


def _native() -> Gemm | None:
    """csrc/gemm_cpu.c from the native kernels' library (AVX-512, or its portable loop)."""
    kernel = cpu_native.decode_kernel()
    if kernel is None:
        return None
    lib, c_int, ptr = kernel.lib, ctypes.c_int, ctypes.c_void_p
    lib.pagedserve_gemm_pack_size.restype = ctypes.c_int64
    lib.pagedserve_gemm_pack_size.argtypes = [c_int, c_int]
    lib.pagedserve_gemm_pack.restype = None
    lib.pagedserve_gemm_pack.argtypes = [ptr, c_int, c_int, c_int, ptr]  # w, n, k, ldw, dest
    compute = lib.pagedserve_gemm_compute
    compute.restype, compute.argtypes = None, _COMPUTE_ARGS
    vector = bool(lib.pagedserve_gemm_avx512())
    return Gemm(
        "native-avx512" if vector else "native-portable",
        lib.pagedserve_gemm_pack_size,
        lambda src, n, k, dst: lib.pagedserve_gemm_pack(src, n, k, k, dst),
        compute,
        1 if vector else MIN_ROWS,  # one AVX-512 row is still twice F.linear's speed
        threaded=False,
    )


def _decode_seconds(gemm: Gemm) -> float:
    """Best time of a decode-sized call (32 rows, a 1024 x 512 weight) on this core."""
    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(1024, 512, generator=gen), torch.randn(32, 512, generator=gen)
    packed, out = gemm.pack(weight, 0, 1024), torch.empty(32, 1024)
    args = (_ROW_MAJOR, _NO_TRANS, _PACKED, 32, 1024, 512, x.data_ptr(), 512, packed.data_ptr(), 512, 0.0,
            out.data_ptr(), 1024)  # fmt: skip
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(8):
            gemm.compute(*args)
        best = min(best, time.perf_counter() - start)
    return best / 8


def _choose() -> Gemm | None:
    """PAGEDSERVE_PACKED_GEMM=mkl or native forces one; by default the faster of MKL's and the
    native AVX-512 one on this CPU (MKL takes its AVX-512 path on Intel CPUs only)."""
    forced = os.environ.get(GEMM_ENV, "auto").strip().lower()
    if forced == "mkl":
        return _mkl()
    if forced == "native":
        return _native()
    mkl, native = _mkl(), _native()
    if native is not None and native.name != "native-avx512":
        native = None  # its portable loop is for checking, not for speed
    if mkl is None or native is None:
        return mkl or native
    mkl_seconds, native_seconds = _decode_seconds(mkl), _decode_seconds(native)
    chosen = native if native_seconds < mkl_seconds else mkl
    log.info(
        "packed linears: %s's GEMM (32 rows x 1024 x 512: MKL %.0f us, native AVX-512 %.0f us)",
        chosen.name, mkl_seconds * 1e6, native_seconds * 1e6,
    )  # fmt: skip
    return chosen


def gemm() -> Gemm | None:
    """The packed GEMM this process uses (decided once), or None where there is none."""
    with _lock:
        if "gemm" not in _loaded:
            _loaded["gemm"] = _choose()
        return _loaded["gemm"]  # type: ignore[return-value]


def _granule_keeps_bits(gemm: Gemm, granule: int) -> bool:
    """Whether rows padded up to a multiple of `granule` keep their bits from 3 to 64 rows, on two
    shapes (square-ish and wide, one inner dimension no power of two)."""
    gen = torch.Generator().manual_seed(0)
    for out_features, in_features in ((176, 64), (96, 40)):
        linear = PackedLinear(
            gemm, torch.randn(out_features, in_features, generator=gen), None, granule=granule
        )
        x = torch.randn(_PROBE_ROWS, in_features, generator=gen)
        full = linear(x)
        for m in range(MIN_ROWS, _PROBE_ROWS):
            if not (torch.equal(linear(x[:m]), full[:m]) and torch.equal(linear(x[-m:]), full[-m:])):
                return False
    return True


def row_granule(gemm: Gemm) -> int:
    """The row multiple this CPU's packed kernels keep a row's bits at (probed once per process)."""
    key = f"granule:{gemm.name}"
    with _lock:
        if key not in _loaded:
            granule = next((g for g in _GRANULES if _granule_keeps_bits(gemm, g)), None)
            if granule is None:
                log.warning(
                    "packed linears: no row multiple up to %d keeps a row's bits on this CPU", _GRANULES[-1]
                )
            elif granule > 1:
                log.info(
                    "packed linears: row counts padded to a multiple of %d (it keeps a row's bits on this CPU)",
                    granule,
                )
            _loaded[key] = granule or 1
        return _loaded[key]  # type: ignore[return-value]


class PackedLinear:
    """y = x @ weight.T (+ bias) for float32 CPU tensors, the weight [out, in] packed at construction
    (a model's weights do not change while it serves; a later change would reach only F.linear's
    calls, of fewer than `gemm.min_rows` rows or on more threads than a single-core GEMM uses)."""

    def __init__(
        self, gemm: Gemm, weight: torch.Tensor, bias: torch.Tensor | None, granule: int | None = None
    ) -> None:
        self.gemm = gemm
        self.granule = row_granule(gemm) if granule is None else granule  # rows padded to a multiple
        self.weight = weight.detach()  # the module's own tensor, for F.linear's calls
        weight = self.weight.contiguous()
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else bias.detach().contiguous()
        self._compute = gemm.compute
        self.helpers = cpu_native.helpers()
        self.starts = slice_starts(self.out_features, self.helpers.workers if self.helpers is not None else 1)
        self.slices = [
            gemm.pack(weight, c0, c1) for c0, c1 in zip(self.starts[:-1], self.starts[1:], strict=True)
        ]
        # for calls on several threads, which a one-core GEMM leaves to others
        self.onednn_weight = None if gemm.threaded else _onednn_weight(weight)
        if len(self.slices) > 1:
            self._slice_ptrs = (ctypes.c_void_p * len(self.slices))(*(t.data_ptr() for t in self.slices))
            self._slice_starts = (ctypes.c_int64 * len(self.starts))(*self.starts)
            self._compute_addr = ctypes.cast(self._compute, ctypes.c_void_p).value

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k, n = self.in_features, self.out_features
        if x.shape[-1] != k:
            raise ValueError(f"input has {x.shape[-1]} features, the weight takes {k}")
        rows = x.reshape(-1, k).contiguous()
        m = rows.shape[0]
        threads = torch.get_num_threads()
        if threads > 1 and not self.gemm.threaded:
            if self.onednn_weight is None or not m:
                return F.linear(x, self.weight, self.bias)
            out = torch.ops.mkldnn._linear_pointwise(rows, self.onednn_weight, self.bias, "none", [], "")
            return out.view(*x.shape[:-1], n)
        if m < self.gemm.min_rows:
            return F.linear(x, self.weight, self.bias)
        if m % self.granule:  # zero rows up to the multiple that keeps every row's bits
            padded = rows.new_zeros((m + self.granule - m % self.granule, k))
            padded[:m] = rows
            return self(padded)[:m].view(*x.shape[:-1], n)
        out = torch.empty((m, n), dtype=torch.float32)
        if m and len(self.slices) > 1:
            # on one torch thread shared with the helpers; with more (a heavy step), torch's
            # threads run each slice in turn
            pool = self.helpers.handle if threads == 1 else None
            self.helpers.sgemm_slices(
                pool, self._compute_addr, m, n, k, rows.data_ptr(), self._slice_ptrs, self._slice_starts,
                len(self.slices), out.data_ptr(),
            )  # fmt: skip
        elif m:
            # beta = 0, the bias added after: with beta = 1 and one row, MKL's result was wrong
            self._compute(
                _ROW_MAJOR, _NO_TRANS, _PACKED, m, n, k,
                rows.data_ptr(), k, self.slices[0].data_ptr(), k, 0.0, out.data_ptr(), n,
            )  # fmt: skip
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], n)


def _onednn_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """The [out, in] float32 weight in oneDNN's blocked layout for its linear, or None (switched off,
    or a torch without oneDNN)."""
    if not switched_on(ONEDNN_SWITCH) or not torch.backends.mkldnn.is_available():
        return None
    try:  # the row count is only a hint for the layout: 256 to 2,048 rows ran as fast with any
        return torch.ops.mkldnn._reorder_linear_weight(weight, 1024)
    except (AttributeError, RuntimeError) as e:
        log.info("oneDNN linears unavailable (%s)", e)
        return None


def packed_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> PackedLinear | None:
    """A PackedLinear for a float32 CPU weight (and bias), or None where F.linear is to be kept."""
    if not switched_on(ENV_SWITCH) or weight.device.type != "cpu" or weight.dtype != torch.float32:
        return None
    if bias is not None and (bias.device.type != "cpu" or bias.dtype != torch.float32):
        return None
    if weight.dim() != 2 or min(weight.shape) < 1:
        return None
    chosen = gemm()
    return None if chosen is None else PackedLinear(chosen, weight, bias)
