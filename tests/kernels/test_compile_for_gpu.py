"""The Triton kernels compile for a GPU (sm_90, down to a cubin), with no GPU present.

The interpreter runs kernels as numpy and accepts code the compiler rejects (loop-carried types,
dot shapes, pointer casts), so this compiles each kernel ahead of time for a few representative
configurations. It runs in a subprocess because this test session interprets Triton.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import pagedserve.kernels  # noqa: F401

    modules = {name: sys.modules["pagedserve.kernels." + name] for name in
               ("paged_attention", "reshape_and_cache", "copy_blocks")}
    target = GPUTarget("cuda", 90, 32)


    def compile_kernel(fn, types, constexprs):
        signature = {}
        for param in fn.params:
            if param.is_constexpr:
                signature[param.name] = "constexpr"
            else:
                signature[param.name] = types.get(param.name, "i64")
        kernel = triton.compile(ASTSource(fn, signature, constexprs), target=target)
        assert kernel.asm["cubin"], fn


    def attention_types(dtype):
        pointers = ("out_ptr", "query_ptr", "k_cache_ptr", "v_cache_ptr")
        types = {name: "*" + dtype for name in pointers}
        types.update(block_table_ptr="*i32", seq_lens_ptr="*i32", cu_seqlens_q_ptr="*i32",
                     part_out_ptr="*fp32", part_max_ptr="*fp32", part_sum_ptr="*fp32",
                     qk_scale="fp32", num_seqs="i32", num_heads="i32", num_splits="i32")
        return types


    attention = modules["paged_attention"]._paged_attention_kernel
    for dtype, head_dim, queries_per_kv, block_size in (
        ("fp32", 80, 7, 16), ("bf16", 256, 8, 128), ("fp16", 64, 32, 8)
    ):
        padded = max(16, triton.next_power_of_2(head_dim))
        block_m = max(16, triton.next_power_of_2(queries_per_kv))
        compile_kernel(attention, attention_types(dtype), dict(
            HEAD_DIM=head_dim, HEAD_DIM_PADDED=padded, QUERIES_PER_KV=queries_per_kv,
            BLOCK_SIZE=block_size, BLOCK_Q=block_m // queries_per_kv, BLOCK_M=block_m,
            TILE_N=64 if padded <= 128 else 32, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
            DOT_IN_FP32=False, SPLIT=head_dim != 80))
    compile_kernel(modules["paged_attention"]._combine_splits_kernel,
                   dict(out_ptr="*bf16", part_out_ptr="*fp32", part_max_ptr="*fp32", part_sum_ptr="*fp32",
                        num_heads="i32", num_splits="i32"),
                   dict(HEAD_DIM=80, HEAD_DIM_PADDED=128, SPLITS_PADDED=16))

    compile_kernel(modules["reshape_and_cache"]._reshape_and_cache_kernel,
                   dict(key_ptr="*bf16", value_ptr="*bf16", k_cache_ptr="*bf16", v_cache_ptr="*bf16",
                        slot_mapping_ptr="*i64", num_kv_heads="i32", head_dim="i32"),
                   dict(BLOCK_SIZE=16, HEADS_PADDED=8, HEAD_DIM_PADDED=128))
    compile_kernel(modules["copy_blocks"]._copy_blocks_kernel,
                   dict(cache_ptrs_ptr="*i64", dtype_ptr="*fp16", block_mapping_ptr="*i64"),
                   dict(CHUNK=4096))
    print("compiled")
    """
)


def test_kernels_compile_for_sm90(tmp_path: Path) -> None:
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from a cache
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]
