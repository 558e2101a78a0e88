"""The pools benchmark's trace: system prompts interleaved, each request its own tail."""

from __future__ import annotations

from pagedserve.bench.pools_bench import trace


def test_trace_interleaves_system_prompts() -> None:
    requests = trace(systems=3, users=4, system_len=20, user_len=5, output_len=7, seed=1)
    assert len(requests) == 12 and all(r.output_len == 7 for r in requests)
    assert all(len(r.prompt_token_ids) == 25 for r in requests)
    systems = [tuple(r.prompt_token_ids[:20]) for r in requests]
    assert len(set(systems)) == 3
    assert systems[:3] == systems[3:6] == systems[9:12], "user u of every system prompt, then user u + 1"
    assert len({tuple(r.prompt_token_ids[20:]) for r in requests}) == 12
    assert trace(3, 4, 20, 5, 7, seed=2)[0].prompt_token_ids != requests[0].prompt_token_ids
