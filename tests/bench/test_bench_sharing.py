"""The sharing benchmark at its smallest: real scheduler, real executor on the bundled model, real Redis.

One request per trace, short outputs, beam width 2 and n = 2: beams and choices save blocks,
no sample ever has more blocks with sharing than without, the blocks counted with sharing are
the block manager's used blocks, nothing is preempted and fsck is clean after every run. Its docs section keeps its place when the section is rewritten.
"""

from __future__ import annotations

import argparse
import json

import pytest
import redis

from pagedserve.bench import sharing_bench
from pagedserve.bench.sharing_report import BEGIN, END, existing_section, replace_section, section
from pagedserve.bench.workload import BenchRequest


def tiny_args(bundled_model_path: str, tmp_path) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sharing_bench.add_arguments(parser)
    return parser.parse_args(
        [
            "--model", bundled_model_path, "--device", "cpu", "--requests", "1", "--widths", "2",
            "--ns", "2", "--alpaca-output", "12", "--sharegpt-prompt", "40", "--out-min", "10",
            "--out-max", "14", "--blocks", "128", "--max-model-len", "256",
            "--out", str(tmp_path / "bench_sharing.json"),
        ]
    )  # fmt: skip


@pytest.fixture(scope="module")
def rows(bundled_model_path, redis_server, tmp_path_factory) -> list[dict]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    try:
        return sharing_bench.run(tiny_args(bundled_model_path, tmp_path_factory.mktemp("sharing")), client)
    finally:
        client.close()


def test_beams_and_choices_share_blocks_and_leave_the_pool_clean(rows) -> None:
    assert [(r["trace"], r["mode"], r["width"]) for r in rows] == [
        ("alpaca", "beam", 2), ("alpaca", "parallel", 2), ("sharegpt", "beam", 2), ("sharegpt", "parallel", 2),
    ]  # fmt: skip
    for r in rows:
        what = f"{r['trace']} {r['mode']}"
        assert r["samples"], what
        assert all(shared <= unshared for shared, unshared in r["samples"]), what
        # the tables' distinct blocks are what the block manager counts as used at that moment
        assert [shared for shared, _ in r["samples"]] == r["pool_used"], what
        assert r["peak_with"] <= r["peak_without"], what
        assert r["fsck"] == [], what
        assert r["preemptions"] == 0, what
        if r["mode"] == "beam":
            assert r["saving"] > 0, what
            assert 0 < r["mean_output"] <= 14
        else:  # ignore_eos: every choice has the trace's length; the prompt's full block is shared
            assert r["mean_output"] >= 10
            assert r["saving"] > 0, what


def test_the_saving_is_one_minus_the_ratio_of_the_sums() -> None:
    samples = sharing_bench.Samples([(3, 4), (5, 8), (2, 2)])
    assert samples.saving() == pytest.approx(1 - 10 / 14)
    assert sharing_bench.Samples().saving() == 0.0
    # prompt of 32 (2 full blocks), one output token, 2 choices: 2 + 2 x 1 blocks against 2 x 3
    request = BenchRequest(list(range(3, 35)), 1)
    assert sharing_bench.prompt_only_saving([request], 2, 16) == pytest.approx(1 - 4 / 6)
    assert sharing_bench.prompt_only_saving([BenchRequest([5] * 15, 4)], 6, 16) == 0.0  # no full block


def test_the_docs_section_is_replaced_in_place(rows, bundled_model_path, tmp_path) -> None:
    result = {"config": vars(tiny_args(bundled_model_path, tmp_path)), "rows": rows}
    text = section(result)
    assert text.startswith(BEGIN) and text.endswith(END)
    assert "| alpaca-like | beam search | 2 |" in text and "37.6–55.2%" in text
    docs = f"# B\n\n## before\n\n{BEGIN}\nold\n{END}\n\n## after\n"
    new = replace_section(docs, text)
    assert new.index("## before") < new.index(BEGIN) < new.index(END) < new.index("## after")
    assert "\nold\n" not in new and existing_section(new) == text
    json.dumps(rows)  # the JSON the bench writes takes every field
