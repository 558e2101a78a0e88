"""float32 linears on CPU with the weight packed once, through MKL's packed GEMM API.

`F.linear` on CPU calls MKL's sgemm, which copies ("packs") the weight into its kernel's tiled layout
on every call. A decode step multiplies a few rows by every weight of the model, so that copy is
a large part of the step: a 25 M-parameter Llama's linears at 32 rows take 22 ms with `F.linear`
and 16 ms with the weights packed once at load (1.2-1.45x from 4 to 512 rows; docs/EXECUTOR_BENCH.md,
"Packed linears"). One or two rows are a matrix-vector product, which F.linear does as fast without
the copy (a few percent faster, measured), so those keep F.linear. MKL exports the API (`cblas_sgemm_pack`,
`cblas_sgemm_compute`) from the libtorch_cpu that torch's x86 wheels ship; it is looked up there.

Two properties matter for serving:
- from `MIN_ROWS` rows up, a row's result does not depend on how many rows are multiplied with it
  (checked up to 64 rows in tests/kernels/test_packed_gemm.py). `F.linear` switches kernels with the
  row count (at 16 rows on an AVX-512 Xeon), and its bits with them. MKL's packed kernels keep a
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
it costs about as much memory again as the packed matrices. Optional by design: without the
symbols (another BLAS, a non-x86 build), for non-float32 weights, or with
PAGEDSERVE_PACKED_LINEARS=0, `packed_linear()` returns None and callers keep `F.linear`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading

import torch
import torch.nn.functional as F

from pagedserve.common.switches import switched_on

from . import cpu_native

log = logging.getLogger(__name__)

ENV_SWITCH = "PAGEDSERVE_PACKED_LINEARS"

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
_loaded: dict[str, object] = {}  # "lib" -> ctypes.CDLL | None, once decided


def _load() -> ctypes.CDLL | None:
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        lib = ctypes.CDLL(path)
        get_size, pack, compute = lib.cblas_sgemm_pack_get_size, lib.cblas_sgemm_pack, lib.cblas_sgemm_compute
    except (OSError, AttributeError) as e:
        log.info("packed linears unavailable (%s); using F.linear", e)
        return None
    c_int, c_float, ptr = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    get_size.restype = ctypes.c_size_t
    get_size.argtypes = [c_int, c_int, c_int, c_int]  # identifier, m, n, k
    pack.restype = None
    # layout, identifier, trans, m, n, k, alpha, src, ld, dest
    pack.argtypes = [c_int, c_int, c_int, c_int, c_int, c_int, c_float, ptr, c_int, ptr]
    compute.restype = None
    # layout, transa, transb, m, n, k, a, lda, b, ldb, beta, c, ldc
    compute.argtypes = [c_int, c_int, c_int, c_int, c_int, c_int, ptr, c_int, ptr, c_int, c_float, ptr, c_int]
    return lib


def _library() -> ctypes.CDLL | None:
    with _lock:
        if "lib" not in _loaded:
            _loaded["lib"] = _load()
        return _loaded["lib"]  # type: ignore[return-value]


def _granule_keeps_bits(lib: ctypes.CDLL, granule: int) -> bool:
    """Whether rows padded up to a multiple of `granule` keep their bits from 3 to 64 rows, on two
    shapes (square-ish and wide, one inner dimension no power of two)."""
    gen = torch.Generator().manual_seed(0)
    for out_features, in_features in ((176, 64), (96, 40)):
        linear = PackedLinear(
            lib, torch.randn(out_features, in_features, generator=gen), None, granule=granule
        )
        x = torch.randn(_PROBE_ROWS, in_features, generator=gen)
        full = linear(x)
        for m in range(MIN_ROWS, _PROBE_ROWS):
            if not (torch.equal(linear(x[:m]), full[:m]) and torch.equal(linear(x[-m:]), full[-m:])):
                return False
    return True


def row_granule(lib: ctypes.CDLL) -> int:
    """The row multiple this CPU's packed kernels keep a row's bits at (probed once per process)."""
    with _lock:
        if "granule" not in _loaded:
            granule = next((g for g in _GRANULES if _granule_keeps_bits(lib, g)), None)
            if granule is None:
                log.warning(
                    "packed linears: no row multiple up to %d keeps a row's bits on this CPU", _GRANULES[-1]
                )
            elif granule > 1:
                log.info(
                    "packed linears: row counts padded to a multiple of %d (it keeps a row's bits on this CPU)",
                    granule,
                )
            _loaded["granule"] = granule or 1
        return _loaded["granule"]  # type: ignore[return-value]


class PackedLinear:
    """y = x @ weight.T (+ bias) for float32 CPU tensors, the weight [out, in] packed at construction
    (a model's weights do not change while it serves; a later change would reach only F.linear's
    calls of fewer than MIN_ROWS rows)."""

    def __init__(
        self, lib: ctypes.CDLL, weight: torch.Tensor, bias: torch.Tensor | None, granule: int | None = None
    ) -> None:
        self.granule = row_granule(lib) if granule is None else granule  # rows padded to a multiple
        self.weight = weight.detach()  # the module's own tensor, for F.linear below MIN_ROWS rows
        weight = self.weight.contiguous()
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else bias.detach().contiguous()
        self._compute = lib.cblas_sgemm_compute
        self.helpers = cpu_native.helpers()
        n, k = self.out_features, self.in_features
        self.starts = slice_starts(n, self.helpers.workers if self.helpers is not None else 1)
        self.slices = []
        for c0, c1 in zip(self.starts[:-1], self.starts[1:], strict=True):
            size = lib.cblas_sgemm_pack_get_size(_B_MATRIX, _PACK_ROWS, c1 - c0, k)
            # MKL's size has room for its widest tiling; only what it writes becomes resident.
            packed = torch.empty(-(-size // 4), dtype=torch.float32)
            lib.cblas_sgemm_pack(
                _ROW_MAJOR, _B_MATRIX, _TRANS, _PACK_ROWS, c1 - c0, k, 1.0, weight[c0].data_ptr(), k, packed.data_ptr()
            )  # fmt: skip
            self.slices.append(packed)
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
        if m < MIN_ROWS:
            return F.linear(x, self.weight, self.bias)
        if m % self.granule:  # zero rows up to the multiple that keeps every row's bits
            padded = rows.new_zeros((m + self.granule - m % self.granule, k))
            padded[:m] = rows
            return self(padded)[:m].view(*x.shape[:-1], n)
        out = torch.empty((m, n), dtype=torch.float32)
        if m and len(self.slices) > 1:
            # on one torch thread shared with the helpers; with more (a heavy step), torch's
            # threads run each slice in turn
            pool = self.helpers.handle if torch.get_num_threads() == 1 else None
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


def packed_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> PackedLinear | None:
    """A PackedLinear for a float32 CPU weight (and bias), or None where F.linear is to be kept."""
    if not switched_on(ENV_SWITCH) or weight.device.type != "cpu" or weight.dtype != torch.float32:
        return None
    if bias is not None and (bias.device.type != "cpu" or bias.dtype != torch.float32):
        return None
    if weight.dim() != 2 or min(weight.shape) < 1:
        return None
    lib = _library()
    return None if lib is None else PackedLinear(lib, weight, bias)
