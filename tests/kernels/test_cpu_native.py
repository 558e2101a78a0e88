"""The native CPU decode kernel (`kernels/csrc/paged_decode_cpu.c`): built here with the machine's
compiler (CI installs one: `make install` needs it for torch.compile anyway), checked against the
dense reference and the gather + SDPA path on pools whose unused slots hold NaN."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pagedserve.kernels import cpu_native, paged_attention_ref
from pagedserve.kernels.torch_attention import AttentionPlan


@pytest.fixture(scope="module")
def kernel() -> cpu_native.DecodeKernel:
    built = cpu_native.decode_kernel()
    assert built is not None, "the native decode kernel did not build (see the log for the compiler's error)"
    return built


@pytest.mark.parametrize(
    "num_heads, num_kv_heads, head_dim, block_size",
    [
        (2, 2, 8, 4),
        (6, 2, 32, 16),
        (8, 1, 64, 8),
        (4, 4, 128, 16),
        (3, 1, 12, 4),
        (8, 4, 32, 16),
        (8, 4, 64, 16),
    ],
    ids=["mha-d8", "gqa3-d32", "mqa-d64", "d128", "d12", "gqa2-d32", "gqa2-d64"],
)
def test_decodes_match_the_reference(
    paged_batch, kernel, num_heads, num_kv_heads, head_dim, block_size
) -> None:
    seq_lens = [1, 5, block_size, block_size + 1, 97, 300, 41]
    batch = paged_batch(
        [1] * len(seq_lens), seq_lens, num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, block_size=block_size, dtype=torch.float32,
    )  # fmt: skip
    plan = AttentionPlan(batch.block_table, batch.seq_lens, batch.cu_seqlens_q, block_size)
    assert plan.native is not None
    out = torch.full_like(batch.query, float("nan"))
    plan.attend(batch.query, batch.k_cache, batch.v_cache, 0.3, out)
    torch.testing.assert_close(out, paged_attention_ref(*batch.args(), 0.3), atol=2e-5, rtol=1e-5)


def test_mixed_step_sends_only_decodes_to_the_kernel(paged_batch) -> None:
    # Prefills and chunked prefills keep the gather + SDPA path; decodes sit at non-adjacent rows.
    batch = paged_batch(
        [1, 7, 1, 3, 12, 1], [9, 7, 33, 20, 12, 150],
        num_heads=4, num_kv_heads=2, head_dim=16, block_size=8, dtype=torch.float32,
    )  # fmt: skip
    plan = AttentionPlan(batch.block_table, batch.seq_lens, batch.cu_seqlens_q, 8)
    assert plan.native is not None and plan.native.tokens.tolist() == [0, 8, 24]
    assert [g.decode for g in plan.other_groups] == [False]
    out = torch.full_like(batch.query, float("nan"))
    plan.attend(batch.query, batch.k_cache, batch.v_cache, 0.25, out)
    torch.testing.assert_close(out, paged_attention_ref(*batch.args(), 0.25), atol=2e-5, rtol=1e-5)


def test_native_and_gather_paths_agree(paged_batch) -> None:
    seq_lens = [300, 20, 25, 30, 280, 16, 40, 22, 35, 18]
    batch = paged_batch(
        [1] * len(seq_lens), seq_lens, num_heads=8, num_kv_heads=2, head_dim=32, block_size=16,
        dtype=torch.float32,
    )  # fmt: skip
    outs = []
    for native in (True, False):
        plan = AttentionPlan(batch.block_table, batch.seq_lens, batch.cu_seqlens_q, 16, native=native)
        assert (plan.native is not None) == native
        out = torch.empty_like(batch.query)
        plan.attend(batch.query, batch.k_cache, batch.v_cache, 0.2, out)
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], atol=2e-5, rtol=1e-5)


def test_other_dtypes_fall_back_to_the_gather_path(paged_batch) -> None:
    # The kernel is float32 only; a bfloat16 pool on CPU still gets the right answer.
    batch = paged_batch(
        [1, 1, 1], [17, 3, 40], num_heads=4, num_kv_heads=2, head_dim=16, block_size=8, dtype=torch.bfloat16
    )
    plan = AttentionPlan(batch.block_table, batch.seq_lens, batch.cu_seqlens_q, 8)
    assert plan.native is not None and not cpu_native.supports(
        batch.query, batch.k_cache, batch.v_cache, batch.query
    )
    out = torch.empty_like(batch.query)
    plan.attend(batch.query, batch.k_cache, batch.v_cache, 0.25, out)
    ref = paged_attention_ref(*(t.float() if t.is_floating_point() else t for t in batch.args()), 0.25)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_threads_split_the_sequences_and_agree(paged_batch, kernel) -> None:
    seq_lens = [64, 33, 200, 7, 90, 150, 12, 64]
    batch = paged_batch(
        [1] * len(seq_lens), seq_lens, num_heads=4, num_kv_heads=2, head_dim=32, block_size=16,
        dtype=torch.float32,
    )  # fmt: skip
    plan = AttentionPlan(batch.block_table, batch.seq_lens, batch.cu_seqlens_q, 16)
    native = plan.native
    outs = []
    for threads in (1, 3):
        out = torch.full_like(batch.query, float("nan"))
        kernel(batch.query, batch.k_cache, batch.v_cache, out, native.block_table, native.seq_lens,
               native.tokens, 0.3, threads=threads)  # fmt: skip
        outs.append(out)
    assert torch.equal(outs[0], outs[1])  # each sequence is one thread's, so the sums are the same


def test_switched_off_by_the_environment() -> None:
    # A fresh interpreter: the choice is made once per process.
    code = (
        "import torch; from pagedserve.kernels import cpu_native; "
        "from pagedserve.kernels.torch_attention import AttentionPlan; "
        "p = AttentionPlan(torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), "
        "torch.tensor([0, 1], dtype=torch.int32), 4); "
        "print(cpu_native.decode_kernel() is None, p.native is None)"
    )
    env = {**__import__("os").environ, cpu_native.ENV_SWITCH: "0"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True"]


def test_a_failed_build_is_reported_and_leaves_the_gather_path(tmp_path, monkeypatch, caplog) -> None:
    # A compiler that cannot build: decode_kernel() returns None and logs why, instead of raising.
    fake_cc = tmp_path / "cc"
    fake_cc.write_text(
        "#!/bin/sh\necho 'fake-cc 1.0'\n[ \"$1\" = --version ] && exit 0\necho 'no such flag' >&2\nexit 1\n"
    )
    fake_cc.chmod(0o755)
    monkeypatch.setenv("CC", str(fake_cc))
    monkeypatch.setenv("PAGEDSERVE_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cpu_native, "_loaded", {})
    with caplog.at_level("WARNING", logger="pagedserve.kernels.cpu_native"):
        assert cpu_native.decode_kernel() is None
    assert "no such flag" in caplog.text and "gather + SDPA" in caplog.text


def test_peaked_softmax_matches(paged_batch, kernel) -> None:
    # A large scale puts most scores more than 87 below the maximum (the vectorized exp's floor).
    batch = paged_batch(
        [1, 1, 1], [70, 129, 33], num_heads=4, num_kv_heads=2, head_dim=32, block_size=16, dtype=torch.float32
    )
    plan = AttentionPlan(batch.block_table, batch.seq_lens, batch.cu_seqlens_q, 16)
    out = torch.empty_like(batch.query)
    plan.attend(batch.query, batch.k_cache, batch.v_cache, 40.0, out)
    torch.testing.assert_close(out, paged_attention_ref(*batch.args(), 40.0), atol=2e-5, rtol=1e-5)


def test_sequences_sharing_leading_blocks_match_each_alone(paged_batch, kernel) -> None:
    # A common prefix maps sequences to the same first blocks (prefix caching, parallel samples):
    # the kernel works such a group through together, block by block. Each sequence's output is
    # the same bit for bit as when it is the only one in the call, and matches the reference.
    seq_lens = [300, 250, 230, 90, 300, 61, 120, 45]
    batch = paged_batch(
        [1] * len(seq_lens), seq_lens, num_heads=8, num_kv_heads=2, head_dim=32, block_size=16,
        dtype=torch.float32,
    )  # fmt: skip
    table = batch.block_table
    table[1, :12] = table[0, :12]  # a 12-block common prefix, then their own blocks
    table[2, :12] = table[0, :12]
    table[3, :6] = table[0, :6]  # a short context inside the prefix: its last block half used
    table[4, :19] = table[0, :19]  # the whole context shared (a fork's sibling)
    table[6, :1] = table[5, :1]  # another group, sharing one block
    plan = AttentionPlan(table, batch.seq_lens, batch.cu_seqlens_q, 16)
    native = plan.native
    assert native is not None
    together = torch.full_like(batch.query, float("nan"))
    plan.attend(batch.query, batch.k_cache, batch.v_cache, 0.3, together)
    torch.testing.assert_close(together, paged_attention_ref(*batch.args(), 0.3), atol=2e-5, rtol=1e-5)
    for s in range(len(seq_lens)):
        alone = torch.full_like(batch.query, float("nan"))
        kernel(batch.query, batch.k_cache, batch.v_cache, alone, native.block_table[s : s + 1],
               native.seq_lens[s : s + 1], native.tokens[s : s + 1], 0.3)  # fmt: skip
        assert torch.equal(alone[s], together[s]), s
    for threads in (2, 3):  # a group split between threads: the same sums
        out = torch.full_like(batch.query, float("nan"))
        kernel(batch.query, batch.k_cache, batch.v_cache, out, native.block_table, native.seq_lens,
               native.tokens, 0.3, threads=threads)  # fmt: skip
        assert torch.equal(out, together), threads


def test_decodes_shared_with_a_core_helper_match_one_thread(paged_batch, kernel) -> None:
    # Work items shared with a helper thread (claimed one at a time from an atomic counter): the
    # same bits as on one thread, call after call (every item run exactly once: the output starts
    # as NaN each time).
    import os

    seq_lens = [300, 250, 230, 90, 300, 61, 120, 45, 17, 400, 33, 129]
    batch = paged_batch(
        [1] * len(seq_lens), seq_lens, num_heads=8, num_kv_heads=4, head_dim=32, block_size=16,
        dtype=torch.float32,
    )  # fmt: skip
    table = batch.block_table
    table[1, :12] = table[0, :12]
    table[2, :12] = table[0, :12]
    table[4, :19] = table[0, :19]
    plan = AttentionPlan(table, batch.seq_lens, batch.cu_seqlens_q, 16)
    native = plan.native
    assert native is not None
    alone = torch.full_like(batch.query, float("nan"))
    kernel(batch.query, batch.k_cache, batch.v_cache, alone, native.block_table, native.seq_lens,
           native.tokens, 0.3, threads=1)  # fmt: skip
    helpers = cpu_native.start_helpers(tuple(sorted(os.sched_getaffinity(0)))[-1:])
    assert helpers is not None and helpers.workers == 2 and len(helpers.tids) == 1
    try:
        for _ in range(300):
            out = torch.full_like(batch.query, float("nan"))
            kernel(batch.query, batch.k_cache, batch.v_cache, out, native.block_table, native.seq_lens,
                   native.tokens, 0.3, threads=1)  # fmt: skip
            assert torch.equal(out, alone)
    finally:
        cpu_native.stop_helpers()


X86_BUILDS = ["x86-64", "x86-64-v3"] if platform.machine() in ("x86_64", "AMD64") else []


@pytest.mark.parametrize("march", X86_BUILDS, ids=["plain-c", "avx2"])
def test_builds_for_other_cpus(march: str, tmp_path) -> None:
    # The kernel's plain C and AVX2 paths are what CPUs without AVX-512 (or AVX2) run; built here
    # with that -march (its own cache, a fresh process: one build per process), the reference
    # tests above must hold for them too. (This test's own name must not match the -k below.)
    env = {
        **os.environ,
        cpu_native.MARCH_ENV: march,
        "PAGEDSERVE_KERNEL_CACHE": str(tmp_path),
    }
    # The packed-GEMM tests' native half runs the GEMM's portable loop in these builds.
    packed_tests = str(Path(__file__).with_name("test_packed_gemm.py"))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, packed_tests,
         "-k", "(match_the_reference or peaked or sharing_leading or core_helper or native) and not other_cpus"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]
    # It was this build that ran, and it is the path asked for: no register wider than its -march has.
    (built,) = tmp_path.glob("paged_decode_cpu-*.so")
    code = subprocess.run(["objdump", "-d", str(built)], capture_output=True, text=True, timeout=60).stdout
    assert cpu_native.SYMBOL in code
    too_wide = {"x86-64": ("%ymm", "%zmm"), "x86-64-v3": ("%zmm",)}[march]
    assert not any(register in code for register in too_wide), too_wide


def _llama_rotary(tokens: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, D] as Llama's rotary embedding makes them (positions 0..T-1, base 10000)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.arange(tokens, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize(
    "tokens, heads, dim", [(1, 4, 8), (7, 3, 12), (48, 8, 32), (300, 2, 64), (5, 1, 128)]
)
def test_rotary_in_place_has_the_tensor_ops_bits(kernel, tokens, heads, dim) -> None:
    x = torch.randn(tokens, heads, dim, generator=torch.Generator().manual_seed(tokens)) * 3
    cos, sin = _llama_rotary(tokens, dim)
    half = dim // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    expected = (x * cos[:, None]) + (rotated * sin[:, None])  # transformers' apply_rotary_pos_emb
    got = x.clone()
    assert cpu_native.rotary_in_place(got, cos, sin)
    assert torch.equal(got, expected)
    # Rows of a wider tensor (a token stride past H * D) work too.
    wide = torch.zeros(tokens, heads + 1, dim)
    wide[:, :heads] = x
    assert cpu_native.rotary_in_place(wide[:, :heads], cos, sin)
    assert torch.equal(wide[:, :heads], expected) and not wide[:, heads].any()
    # Tensors it does not take are left as they were: heads not adjacent, float64, odd D.
    for bad, c, s in [
        (torch.cat((x, x), dim=-1)[..., :dim], cos, sin),  # a head's D, then a gap
        (x.double(), cos.double(), sin.double()),
        (x[..., :-1].contiguous(), cos[:, :-1].contiguous(), sin[:, :-1].contiguous()),
    ]:
        before = bad.clone()
        assert not cpu_native.rotary_in_place(bad, c, s)
        assert torch.equal(bad, before)
