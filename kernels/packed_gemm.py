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
  row count (at 16 rows on this machine), and its bits with them.
- the bits are not always `F.linear`'s: the sums over the inner dimension may be split at other
  places (differences of about 1e-6 at unit scale, tested); greedy outputs stay token-identical to
  transformers in the tests.

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

log = logging.getLogger(__name__)

ENV_SWITCH = "PAGEDSERVE_PACKED_LINEARS"

# CBLAS enum values (mkl_cblas.h)
_ROW_MAJOR, _NO_TRANS, _TRANS, _PACKED, _B_MATRIX = 101, 111, 112, 151, 162
# The row count MKL is told when packing: the layout serves any row count at compute time;
# this one gave the best times across 1-512 rows on the models measured.
_PACK_ROWS = 256
MIN_ROWS = 3  # fewer rows go to F.linear

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


class PackedLinear:
    """y = x @ weight.T (+ bias) for float32 CPU tensors, the weight [out, in] packed at construction
    (a model's weights do not change while it serves; a later change would reach only F.linear's
    calls of fewer than MIN_ROWS rows)."""

    def __init__(self, lib: ctypes.CDLL, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight = weight.detach()  # the module's own tensor, for F.linear below MIN_ROWS rows
        weight = self.weight.contiguous()
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else bias.detach().contiguous()
        self._compute = lib.cblas_sgemm_compute
        n, k = self.out_features, self.in_features
        size = lib.cblas_sgemm_pack_get_size(_B_MATRIX, _PACK_ROWS, n, k)
        # MKL's size has room for its widest tiling; only what it writes becomes resident.
        self.packed = torch.empty(-(-size // 4), dtype=torch.float32)
        lib.cblas_sgemm_pack(
            _ROW_MAJOR, _B_MATRIX, _TRANS, _PACK_ROWS, n, k, 1.0, weight.data_ptr(), k, self.packed.data_ptr()
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k, n = self.in_features, self.out_features
        if x.shape[-1] != k:
            raise ValueError(f"input has {x.shape[-1]} features, the weight takes {k}")
        rows = x.reshape(-1, k).contiguous()
        m = rows.shape[0]
        if m < MIN_ROWS:
            return F.linear(x, self.weight, self.bias)
        out = torch.empty((m, n), dtype=torch.float32)
        if m:
            # beta = 0, the bias added after: with beta = 1 and one row, MKL's result was wrong
            self._compute(
                _ROW_MAJOR, _NO_TRANS, _PACKED, m, n, k,
                rows.data_ptr(), k, self.packed.data_ptr(), k, 0.0, out.data_ptr(), n,
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
