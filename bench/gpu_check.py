"""Checks and figures that need a CUDA GPU: the Triton kernels, compiled, at real model shapes
against their references; and the paged attention kernel's decode bandwidth next to the card's
copy bandwidth and to dense attention on contiguous K/V (torch's SDPA, no paging).

    python -m pagedserve.bench.gpu_check [--out FILE]

bench/gpu_device_check.sh runs it with the token-identity tests on the GPU and the decode-step
figures. Prints a markdown report; exits 1 when a check fails and 2 where there is no CUDA device.
The CPU test suite checks the same kernels under the Triton interpreter, at small shapes only.

Every check poisons what the kernel writes (NaN) and fills the pool outside each context with NaN,
so an unwritten output or a read outside a context shows. Attention is compared by relative error
‖out - ref‖ / ‖ref‖ against an fp32 reference computed from the same inputs; the copies must be exact.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Callable
from functools import partial

import torch

from pagedserve.kernels.testing import build_paged_batch

# relative error allowed per dtype: fp32 runs IEEE dots; half types round P to the cache dtype
REL_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# (what the shape is, heads, KV heads, head_dim, block size, dtype)
ATTENTION_SHAPES = [
    ("Llama-3.2-1B", 32, 8, 64, 16, torch.bfloat16),
    ("TinyLlama-1.1B", 32, 4, 64, 16, torch.float16),
    ("Llama-3-8B", 32, 8, 128, 16, torch.bfloat16),
    ("Qwen2-7B (7 queries per KV head)", 28, 4, 128, 32, torch.bfloat16),
    ("Mistral-7B in fp32", 32, 8, 128, 16, torch.float32),
    ("Gemma-2B (head_dim 256, MQA)", 8, 1, 256, 16, torch.bfloat16),
    ("GPT-2 (MHA, block 8)", 12, 12, 64, 8, torch.float16),
    ("block 128", 32, 8, 128, 128, torch.bfloat16),
]


def batch_kinds(rng: random.Random) -> dict[str, tuple[list[int], list[int]]]:
    """(q_lens, seq_lens): 64 decodes with contexts up to 4096 (block edges included); 3 decodes,
    whose contexts the kernel splits (see paged_attention.default_num_splits); and a step mixing
    decodes, chunked prefills and whole prompts."""
    decode_lens = [rng.randint(1, 4096) for _ in range(60)] + [1, 16, 17, 4096]
    few_lens = [4096, rng.randint(1, 4096), 5]
    mixed_q = [1] * 12 + [256, 300, 1, 37, 512]
    mixed_s = [rng.randint(1, 2048) for _ in range(12)] + [1000, 300, 3000, 37, 2048]
    return {
        "decode": ([1] * len(decode_lens), decode_lens),
        "decode, split": ([1] * len(few_lens), few_lens),
        "mixed": (mixed_q, mixed_s),
    }


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    return float((got - ref).norm() / ref.norm())


def check_attention(rows: list[str]) -> bool:
    from pagedserve.kernels import paged_attention, paged_attention_ref

    ok = True
    rng = random.Random(0)
    seed = 0
    rows += [
        "| shape | heads / KV / head_dim, block | dtype | batch | tokens | rel. error | limit | max abs | ok |",
        "|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    for name, heads, kv_heads, head_dim, block_size, dtype in ATTENTION_SHAPES:
        for kind, (q_lens, seq_lens) in batch_kinds(rng).items():
            seed += 1
            batch = build_paged_batch(
                q_lens, seq_lens, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                block_size=block_size, dtype=dtype, seed=seed, device="cuda",
            )  # fmt: skip
            scale = head_dim**-0.5
            out = torch.full_like(batch[0], float("nan"))  # poisoned: every element must be written
            paged_attention(*batch, scale, out=out)
            ref = paged_attention_ref(*batch, scale)
            torch.cuda.synchronize()
            err = relative_error(out, ref)
            limit = REL_TOLERANCE[dtype]
            good = bool(torch.isfinite(out).all()) and err <= limit
            ok &= good
            rows.append(
                f"| {name} | {heads} / {kv_heads} / {head_dim}, {block_size} | {str(dtype)[6:]} | {kind} | "
                f"{sum(q_lens)} | {err:.2e} | {limit:.0e} | {(out.float() - ref.float()).abs().max():.2e} | "
                f"{'yes' if good else '**NO**'} |"
            )
    return ok


def check_copies(rows: list[str]) -> bool:
    """reshape_and_cache (a prefill's keys cut from a fused QKV output, some slots -1), copy_blocks
    over 22 layers, swap_blocks out to pinned CPU memory and back: each bit-exact against its reference."""
    from pagedserve.kernels import copy_blocks, copy_blocks_ref, reshape_and_cache, reshape_and_cache_ref
    from pagedserve.kernels.swap_blocks import swap_blocks

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(1)
    results: list[tuple[str, bool]] = []

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return bool(((a == b) | (a.isnan() & b.isnan())).all())

    # reshape_and_cache: 2048 tokens, 8 KV heads of 128, block 16, bf16
    tokens, heads, kv_heads, head_dim, num_blocks, block_size = 2048, 32, 8, 128, 160, 16
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=dev, generator=gen).to(torch.bfloat16)
    key = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    value = qkv[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, device=dev, generator=gen)[:tokens]
    slots[::7] = -1
    pool = torch.full(
        (num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=torch.bfloat16, device=dev
    )
    got_k, got_v, ref_k, ref_v = (pool.clone() for _ in range(4))
    reshape_and_cache(key, value, got_k, got_v, slots)
    reshape_and_cache_ref(key, value, ref_k, ref_v, slots)
    results.append(
        ("reshape_and_cache, 2048 tokens, 8 x 128, bf16", same(got_k, ref_k) and same(got_v, ref_v))
    )

    # copy_blocks: 22 layers of 512 blocks (16 x 4 x 64, bf16), 100 pairs, sources may repeat
    layers = 22
    caches = [
        torch.randn(512, 16, 4, 64, device=dev, generator=gen).to(torch.bfloat16) for _ in range(2 * layers)
    ]
    dst = torch.randperm(512, device=dev, generator=gen)[:100]
    src = torch.randint(0, 512, (100,), device=dev, generator=gen)
    mapping = torch.stack([src, dst], dim=1)
    mapping = mapping[~torch.isin(mapping[:, 0], mapping[:, 1])]  # no block both read and written
    got = [c.clone() for c in caches]
    ref = [c.clone() for c in caches]
    copy_blocks(got[:layers], got[layers:], mapping)
    copy_blocks_ref(ref[:layers], ref[layers:], mapping)
    results.append(
        (
            f"copy_blocks, 22 layers, {mapping.size(0)} pairs",
            all(same(a, b) for a, b in zip(got, ref, strict=True)),
        )
    )

    # swap_blocks: [2, 22, 256, 16, 4, 64] bf16 on the GPU <-> 128 pinned CPU blocks
    device_kv = torch.randn(2, layers, 256, 16, 4, 64, device=dev, generator=gen).to(torch.bfloat16)
    cpu_kv = torch.full((2, layers, 128, 16, 4, 64), float("nan"), dtype=torch.bfloat16).pin_memory()
    out_pairs = torch.stack([torch.arange(0, 200, 4), torch.arange(50)], dim=1)  # device -> cpu
    swap_blocks(device_kv, cpu_kv, out_pairs)
    out_ok = same(cpu_kv[:, :, :50], device_kv[:, :, 0:200:4].cpu())
    in_pairs = torch.stack([torch.arange(50), torch.arange(200, 250)], dim=1)  # cpu -> device
    before = device_kv.clone()
    swap_blocks(cpu_kv, device_kv, in_pairs)
    torch.cuda.synchronize()
    in_ok = same(device_kv[:, :, 200:250], before[:, :, 0:200:4]) and same(
        device_kv[:, :, :200], before[:, :, :200]
    )
    results.append(("swap_blocks, 50 blocks out to pinned memory and 50 back in", out_ok and in_ok))

    rows += ["| copy | bit-exact |", "|---|---|"]
    rows += [f"| {name} | {'yes' if good else '**NO**'} |" for name, good in results]
    return all(good for _, good in results)


def time_ms(fn: Callable[[], object], graphed: bool = False) -> float:
    """Median milliseconds of `fn`: launched from Python each time, or `graphed`, replayed from a
    CUDA graph (the GPU's own time, as the executor's decode steps run)."""
    import triton.testing

    if graphed:
        return float(triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median"))
    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def attention_figures(rows: list[str]) -> None:
    """Decode attention at Llama-3.2-1B's shape (32 heads, 8 KV heads of 64, bf16, block 16),
    every context the same length, replayed from CUDA graphs: split as the executor's graphs are
    captured and whole, with bytes of K and V read over the time, next to a device copy's bandwidth
    and to SDPA over the same K/V laid out contiguously; and the whole kernel launched from Python."""
    import torch.nn.functional as F

    from pagedserve.kernels import paged_attention
    from pagedserve.kernels.backends import splitting_decode_contexts
    from pagedserve.kernels.paged_attention import decode_num_splits

    dev = torch.device("cuda")
    big = torch.empty(1 << 30, dtype=torch.uint8, device=dev)  # 1 GiB
    copy_target = torch.empty_like(big)
    copy_ms = time_ms(partial(copy_target.copy_, big))
    copy_gbs = 2 * big.numel() / copy_ms / 1e6  # bytes read and written
    rows += [
        f"Device copy of 1 GiB: {copy_ms:.3f} ms, {copy_gbs:.0f} GB/s counting bytes read and written.",
        "",
        "| batch x context | splits | split, graph ms | GB/s of K/V read | of copy bandwidth | whole, graph ms | "
        "SDPA, graph ms | split / SDPA | whole, launched from Python ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    heads, kv_heads, head_dim, block_size = 32, 8, 64, 16
    for batch, context in ((1, 1024), (1, 4096), (8, 2048), (32, 1024), (256, 1024), (256, 4096)):
        q, k_cache, v_cache, table, lens, cu = build_paged_batch(
            [1] * batch, [context] * batch, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            block_size=block_size, dtype=torch.bfloat16, seed=batch + context, device=dev,
        )  # fmt: skip
        out = torch.empty_like(q)
        scale = head_dim**-0.5
        call = partial(paged_attention, q, k_cache, v_cache, table, lens, cu, scale, out=out)
        with splitting_decode_contexts():
            split_ms = time_ms(call, graphed=True)
        whole_ms = time_ms(partial(call, num_splits=1), graphed=True)
        launched_ms = time_ms(call)
        splits = decode_num_splits(batch, heads, kv_heads, table.size(1) * block_size, dev)
        kv_bytes = 2 * batch * context * kv_heads * head_dim * 2
        # the same contexts, contiguous: [B, Hkv, L, D], as a dense flash attention reads them
        blocks = table[:, : context // block_size].long()
        k = k_cache[blocks].reshape(batch, context, kv_heads, head_dim).transpose(1, 2).contiguous()
        v = v_cache[blocks].reshape(batch, context, kv_heads, head_dim).transpose(1, 2).contiguous()
        q4 = q.view(batch, 1, heads, head_dim).transpose(1, 2)  # [B, H, 1, D]
        sdpa = partial(F.scaled_dot_product_attention, q4, k, v, scale=scale, enable_gqa=True)
        sdpa_ms = time_ms(sdpa, graphed=True)
        gbs = kv_bytes / split_ms / 1e6
        rows.append(
            f"| {batch} x {context} | {splits} | {split_ms:.4f} | {gbs:.0f} | {gbs / copy_gbs:.0%} | "
            f"{whole_ms:.4f} | {sdpa_ms:.4f} | {split_ms / sdpa_ms:.2f}x | {launched_ms:.4f} |"
        )


def environment() -> str:
    import transformers
    import triton

    props = torch.cuda.get_device_properties(0)
    return (
        f"{torch.cuda.get_device_name(0)} ({props.multi_processor_count} SMs, "
        f"{props.total_memory / 2**30:.0f} GiB), torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"triton {triton.__version__}, transformers {transformers.__version__}, Python {sys.version.split()[0]}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="also write the report here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: these checks need a GPU (the CPU tests run the kernels interpreted)")
        return 2
    rows = [f"**GPU:** {environment()}", "", "### Triton kernels at model shapes", ""]
    ok = check_attention(rows)
    rows.append("")
    ok &= check_copies(rows)
    rows += ["", "### Decode attention: bandwidth", ""]
    attention_figures(rows)
    report = "\n".join(rows)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")
    print("all kernel checks passed" if ok else "A KERNEL CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
