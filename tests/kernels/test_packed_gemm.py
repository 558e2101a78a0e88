"""Linears on packed weights (kernels/packed_gemm.py): F.linear's values to float32 rounding, a
row's bits independent of the batch around it, and None wherever F.linear has to stay; each test
on both GEMMs, MKL's and the native one (its AVX-512 kernel where the CPU has it, else its
portable loop)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedserve.kernels import packed_gemm
from pagedserve.kernels.packed_gemm import ENV_SWITCH, GEMM_ENV, PackedLinear, gemm, packed_linear

# (out, in): square, wide, narrow, and an inner dimension that is no power of two
SHAPES = [(64, 64), (176, 64), (16, 64), (64, 176), (96, 40)]


@pytest.fixture(autouse=True, params=["mkl", "native"])
def backend(request, monkeypatch):
    """Each test on one GEMM, chosen as PAGEDSERVE_PACKED_GEMM chooses it, the process's choice
    restored afterwards."""
    monkeypatch.setenv(GEMM_ENV, request.param)
    monkeypatch.delitem(packed_gemm._loaded, "gemm", raising=False)
    chosen = gemm()
    assert chosen is not None and chosen.name.startswith(request.param), "both GEMMs should load here"
    yield chosen
    packed_gemm._loaded.pop("gemm", None)


@pytest.fixture
def one_thread():
    """One torch thread, as a decode step runs (the native GEMM leaves calls on more to F.linear)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _packed(weight: torch.Tensor, bias: torch.Tensor | None = None) -> PackedLinear:
    linear = packed_linear(weight, bias)
    assert linear is not None, "a packed GEMM should be found in this torch build"
    return linear


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_f_linear(shape, with_bias) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    weight = torch.randn(shape, generator=gen) / shape[1] ** 0.5
    bias = torch.randn(shape[0], generator=gen) if with_bias else None
    linear = _packed(weight, bias)
    for rows in (1, 2, 3, 8, 33, 300):
        x = torch.randn(rows, shape[1], generator=gen)
        torch.testing.assert_close(linear(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    x = torch.randn(1, 7, shape[1], generator=gen)  # leading dims kept, as F.linear keeps them
    got = linear(x)
    assert got.shape == (1, 7, shape[0])
    torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    assert linear(torch.empty(0, shape[1])).shape == (0, shape[0])


def test_a_rows_bits_do_not_depend_on_its_batch(one_thread) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(176, 64, generator=gen)
    linear = _packed(weight, torch.randn(176, generator=gen))
    x = torch.randn(64, 64, generator=gen)
    full = linear(x)
    min_rows = linear.gemm.min_rows
    for rows in (min_rows, 3, 4, 5, 8, 16, 17, 32, 63):
        assert torch.equal(linear(x[:rows]), full[:rows]), f"{rows} rows"
        assert torch.equal(linear(x[-rows:]), full[-rows:]), f"the last {rows} rows"
    for rows in range(1, min_rows):  # F.linear's own
        assert torch.equal(linear(x[:rows]), F.linear(x[:rows], linear.weight, linear.bias))


def test_rows_padded_to_the_granule(one_thread) -> None:
    """Where the probe finds that a CPU keeps a row's bits only at some row multiple (4 on an AVX2
    EPYC), a call is padded with zero rows up to it; forced here, so every CPU runs that path."""
    from pagedserve.kernels.packed_gemm import row_granule

    assert row_granule(gemm()) in (1, 2, 4, 8, 16)
    gen = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(96, 40, generator=gen), torch.randn(96, generator=gen)
    padded = PackedLinear(gemm(), weight, bias, granule=4)
    plain = PackedLinear(gemm(), weight, bias, granule=1)
    x = torch.randn(2, 4, 40, generator=gen)
    for rows in (3, 5, 6, 7):
        got = padded(x.reshape(8, 40)[:rows])
        assert got.shape == (rows, 96)
        assert torch.equal(
            got, plain(torch.cat([x.reshape(8, 40)[:rows], torch.zeros(-rows % 4, 40)]))[:rows]
        )
    assert torch.equal(
        padded(x[:, :3]), plain(torch.cat([x[:, :3].reshape(6, 40), torch.zeros(2, 40)]))[:6].view(2, 3, 96)
    )


def test_non_contiguous_input() -> None:
    weight = torch.randn(32, 64)
    x = torch.randn(64, 10).t()  # [10, 64], strided
    torch.testing.assert_close(_packed(weight)(x), F.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_where_f_linear_stays(monkeypatch) -> None:
    assert packed_linear(torch.randn(8, 8, dtype=torch.bfloat16)) is None
    assert packed_linear(torch.randn(8, 8), torch.randn(8, dtype=torch.float64)) is None
    assert packed_linear(torch.randn(8)) is None
    monkeypatch.setenv(ENV_SWITCH, "0")
    assert packed_linear(torch.randn(8, 8)) is None


def test_wrong_input_width_names_both() -> None:
    with pytest.raises(ValueError, match="48 features, the weight takes 64"):
        _packed(torch.randn(8, 64))(torch.randn(2, 48))


def test_column_slices_shared_with_a_core_helper_give_the_same_bits() -> None:
    # With core helpers running, weights are packed in column slices and a one-thread call shares
    # the slices with them: every output is the same bit for bit as the whole weight's, at every
    # row count, on one torch thread (shared) and on two (the slices one after another).
    import os

    from pagedserve.kernels import cpu_native
    from pagedserve.kernels.packed_gemm import slice_starts

    assert slice_starts(1376, 1) == [0, 1376]
    assert slice_starts(1376, 2) == [0, 352, 704, 1056, 1376]
    assert slice_starts(100, 2) == [0, 64, 100]  # slices of at least MIN_SLICE_COLUMNS
    gen = torch.Generator().manual_seed(3)
    weights = [
        torch.randn(shape, generator=gen) for shape in ((1376, 512), (256, 512), (512, 1376), (40, 96))
    ]
    whole = [_packed(w) for w in weights]
    helpers = cpu_native.start_helpers(tuple(sorted(os.sched_getaffinity(0)))[-1:])
    assert helpers is not None, "the core helpers should start wherever the native kernels build"
    threads = torch.get_num_threads()
    try:
        sliced = [_packed(w) for w in weights]
        assert [len(s.slices) for s in sliced] == [4, 4, 4, 1]
        for n in (1, 2):
            torch.set_num_threads(n)
            for rows in (3, 8, 32, 100):
                for a, b in zip(whole, sliced, strict=True):
                    x = torch.randn(rows, a.in_features, generator=gen)
                    for _ in range(5):  # repeated: items taken by either side, in any order
                        assert torch.equal(a(x), b(x)), (n, rows, a.out_features)
    finally:
        torch.set_num_threads(threads)
        cpu_native.stop_helpers()
    assert cpu_native.helpers() is None


@pytest.mark.parametrize("onednn", ["1", "0"])
def test_a_single_core_gemm_leaves_calls_on_more_threads_to_onednn(backend, onednn, monkeypatch) -> None:
    # The native GEMM runs on the calling core only; a call on two torch threads (a prefill step's
    # --prefill-threads) goes to oneDNN's linear on its own copy of the weight, or with
    # PAGEDSERVE_ONEDNN_LINEARS=0 to F.linear, bit for bit. MKL's uses the threads itself.
    monkeypatch.setenv(packed_gemm.ONEDNN_SWITCH, onednn)
    gen = torch.Generator().manual_seed(5)
    weight, bias = torch.randn(96, 64, generator=gen), torch.randn(96, generator=gen)
    x = torch.randn(3, 40, 64, generator=gen)
    linear = _packed(weight, bias)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got, empty = linear(x), linear(x[:, :0])
    finally:
        torch.set_num_threads(threads)
    assert got.shape == (3, 40, 96) and empty.shape == (3, 0, 96)
    assert (linear.onednn_weight is not None) == (onednn == "1" and not backend.threaded)
    if linear.onednn_weight is None and not backend.threaded:
        assert torch.equal(got, F.linear(x, weight, bias))
    else:
        torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_by_default_the_faster_gemm_is_chosen_and_logged(monkeypatch, caplog) -> None:
    monkeypatch.setenv(GEMM_ENV, "auto")
    monkeypatch.delitem(packed_gemm._loaded, "gemm")
    with caplog.at_level("INFO", logger=packed_gemm.__name__):
        chosen = gemm()
    assert chosen is not None and chosen.name in ("mkl", "native-avx512")
    if packed_gemm._native().name == "native-avx512":  # both were timed
        (line,) = [r.getMessage() for r in caplog.records if "32 rows x 1024 x 512" in r.getMessage()]
        assert line.startswith(f"packed linears: {chosen.name}'s GEMM") and "MKL" in line, line
