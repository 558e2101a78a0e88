"""An OpenAI-compatible HTTP load generator: one client for every server compared.

Each request is a streamed greedy `/v1/completions` call with the prompt as token ids,
`max_tokens` = its output length, `ignore_eos` (vLLM's extra, which pagedserve also takes) so
every server generates the same number of tokens, `return_token_ids` (vLLM's extra, also
taken by both) so each chunk says which tokens it carries, and `stream_options.include_usage`
so the output token count is checked against the server's own usage record. The time of every SSE chunk that
carries a choice is recorded, so TTFT, TPOT and ITL are measured the same way for every server
(`bench/metrics.py`), and each request's token ids and text are kept to compare greedy outputs.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import NamedTuple

from pagedserve.bench.metrics import RequestRecord
from pagedserve.bench.workload import BenchRequest, arrival_times


class HttpLoadResult(NamedTuple):
    records: list[RequestRecord]
    texts: list[str]  # each request's whole completion text ("" when it failed)
    token_ids: list[list[int]]  # each request's generated token ids ([] when it failed)


def completion_body(model: str, request: BenchRequest) -> dict[str, object]:
    """The request body every server gets for `request`."""
    return {
        "model": model,
        "prompt": list(request.prompt_token_ids),
        "max_tokens": request.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "return_token_ids": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def parse_sse_line(line: str) -> dict | None:
    """One SSE line to its JSON payload; None for blank lines, comments and `[DONE]`."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:") :].strip()
    if not data or data == "[DONE]":
        return None
    return json.loads(data)


async def served_model(client, base_url: str) -> str:
    """The first model id the server lists at /v1/models."""
    reply = await client.get(f"{base_url}/v1/models")
    reply.raise_for_status()
    return reply.json()["data"][0]["id"]


async def _one(
    client, url: str, model: str, request: BenchRequest, record: RequestRecord
) -> tuple[str, list[int]]:
    pieces: list[str] = []
    ids: list[int] = []
    chunk_times: list[float] = []
    chunk_counts: list[int] = []
    usage_tokens: int | None = None
    record.sent = time.perf_counter()
    try:
        async with client.stream("POST", url, json=completion_body(model, request)) as reply:
            if reply.status_code != 200:
                body = (await reply.aread()).decode(errors="replace")
                raise RuntimeError(f"HTTP {reply.status_code}: {body[:300]}")
            async for line in reply.aiter_lines():
                payload = parse_sse_line(line)
                if payload is None:
                    continue
                if payload.get("choices"):
                    now = time.perf_counter()
                    new = [t for c in payload["choices"] for t in c.get("token_ids") or []]
                    pieces.append("".join(c.get("text") or "" for c in payload["choices"]))
                    if new:  # a chunk without tokens (text held back, a finish reason) is no token event
                        chunk_times.append(now)
                        chunk_counts.append(len(new))
                        ids.extend(new)
                if payload.get("usage"):
                    usage_tokens = payload["usage"]["completion_tokens"]
        if usage_tokens is None:
            raise RuntimeError("the stream ended without a usage record")
        if usage_tokens != request.output_len:
            raise RuntimeError(f"generated {usage_tokens} tokens, asked for {request.output_len}")
        if len(ids) != usage_tokens:
            raise RuntimeError(f"the chunks carried {len(ids)} token ids, usage says {usage_tokens}")
        record.token_times = chunk_times
        record.token_counts = chunk_counts
    except Exception as exc:  # a failed request is reported, not fatal to the run
        record.error = f"{type(exc).__name__}: {exc}"
    record.finished = time.perf_counter()
    return "".join(pieces), ids


async def run_http_load(
    base_url: str, requests: Sequence[BenchRequest], *, rate: float | None = None, seed: int = 0,
    timeout: float = 900.0,
) -> HttpLoadResult:  # fmt: skip
    """Send every request (all at once for rate None, else Poisson) and wait for all of them.
    Times in the records are relative to the run's start."""
    import httpx

    offsets = arrival_times(len(requests), rate, seed)
    records = [
        RequestRecord(f"http-{i}", 0.0, len(r.prompt_token_ids), r.output_len) for i, r in enumerate(requests)
    ]
    limits = httpx.Limits(max_connections=len(requests) + 4, max_keepalive_connections=len(requests) + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        model = await served_model(client, base_url)
        url = f"{base_url}/v1/completions"
        t0 = time.perf_counter()

        async def paced(i: int) -> tuple[str, list[int]]:
            delay = t0 + offsets[i] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            return await _one(client, url, model, requests[i], records[i])

        outputs = await asyncio.gather(*(paced(i) for i in range(len(requests))))
    for r in records:
        r.sent -= t0
        r.finished -= t0
        r.token_times = [t - t0 for t in r.token_times]
    ok = [not r.error for r in records]
    return HttpLoadResult(
        records,
        [text if good else "" for (text, _), good in zip(outputs, ok, strict=True)],
        [ids if good else [] for (_, ids), good in zip(outputs, ok, strict=True)],
    )
