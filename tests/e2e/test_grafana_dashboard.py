"""deploy/grafana/pagedserve.json queries only metrics a running stack exports: every metric
name in every panel's PromQL must be a sample name in the gateway's /metrics (a histogram is
queried through its `_bucket`, `_sum` and `_count` samples, which is what /metrics lists)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "pagedserve.json"
METRIC = re.compile(r"\bpagedserve_[a-zA-Z0-9_:]*")


def panels(items: list[dict]) -> list[dict]:
    out = []
    for panel in items:
        out.append(panel)
        out += panels(panel.get("panels", []))  # a collapsed row holds its panels
    return out


def expressions() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query in the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in panels(dashboard["panels"]) for t in p.get("targets", [])]


def exported_samples(text: str) -> set[str]:
    return {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")
    }


def test_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "pagedserve" and dashboard["title"]
    all_panels = panels(dashboard["panels"])
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    graphs = [p for p in all_panels if p["type"] != "row"]
    assert len(graphs) >= 10
    for panel in graphs:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and set(panel["gridPos"]) == {"h", "w", "x", "y"}, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
    for title, expr in expressions():
        assert METRIC.search(expr), f"{title}: {expr!r} queries no pagedserve metric"
        assert expr.count("(") == expr.count(")") and expr.count("[") == expr.count("]"), f"{title}: {expr!r}"


def test_every_queried_metric_is_exported(http: httpx.Client) -> None:
    # One request first, so that every histogram and per-pool counter has seen something.
    model = http.get("/v1/models").json()["data"][0]["id"]
    assert (
        http.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 2}).status_code == 200
    )
    reply = http.get("/metrics")
    assert reply.status_code == 200
    exported = exported_samples(reply.text)
    queried = {name for _, expr in expressions() for name in METRIC.findall(expr)}
    missing = sorted(queried - exported)
    assert not missing, f"the dashboard queries metrics that /metrics does not export: {missing}"
    # The headline metrics are all there (the dashboard would be hollow without them).
    assert {
        "pagedserve_kv_blocks_used",
        "pagedserve_prefix_cache_hit_tokens_total",
        "pagedserve_time_to_first_token_seconds_bucket",
        "pagedserve_time_per_output_token_seconds_bucket",
        "pagedserve_preemptions_total",
        "pagedserve_pool_requests_routed_total",
        "pagedserve_migrations_total",
    } <= queried
