"""`--allowed-origins`: CORS for browser pages on the listed origins only, preflights answered
before the API key check, and nothing for any other origin or without the flag."""

from __future__ import annotations

import argparse

import httpx
import pytest
from gateway_fakes import FakeScheduler
from gateway_harness import run, serving

from pagedserve.gateway.flags import add_arguments, config_from_args

UI = "https://ui.example.com"
PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization,content-type",
}


def test_listed_origins_get_cors_and_others_do_not() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["ok", "ok"])
        async with (
            serving(scheduler, allowed_origins=(UI,), api_key="k") as (url, _),
            httpx.AsyncClient(base_url=url) as http,
        ):
            # the preflight carries no key: it is answered before the key check
            reply = await http.options("/v1/completions", headers={"Origin": UI, **PREFLIGHT})
            assert reply.status_code == 200, reply.text
            assert reply.headers["access-control-allow-origin"] == UI
            assert "POST" in reply.headers["access-control-allow-methods"]
            assert "authorization" in reply.headers["access-control-allow-headers"].lower()
            # the openai JS SDK's own headers pass too
            sdk = {**PREFLIGHT, "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os"}
            reply = await http.options("/v1/completions", headers={"Origin": UI, **sdk})
            assert reply.status_code == 200, reply.text
            body = {"prompt": "p", "max_tokens": 2}
            headers = {"Origin": UI, "Authorization": "Bearer k"}
            reply = await http.post("/v1/completions", json=body, headers=headers)
            assert reply.status_code == 200 and reply.headers["access-control-allow-origin"] == UI
            assert "retry-after" in reply.headers["access-control-expose-headers"].lower()
            # the key is still needed for the real request
            reply = await http.post("/v1/completions", json=body, headers={"Origin": UI})
            assert reply.status_code == 401 and reply.headers["access-control-allow-origin"] == UI
            other = {"Origin": "https://evil.example", **PREFLIGHT}
            reply = await http.options("/v1/completions", headers=other)
            assert reply.status_code == 400 and "access-control-allow-origin" not in reply.headers
            reply = await http.post(
                "/v1/completions", json=body, headers={**headers, "Origin": "https://evil.example"}
            )
            assert "access-control-allow-origin" not in reply.headers
        assert len(scheduler.submitted) == 2

    run(scenario)


def test_without_the_flag_no_cors() -> None:
    async def scenario() -> None:
        async with serving(FakeScheduler(["ok"])) as (url, _), httpx.AsyncClient(base_url=url) as http:
            reply = await http.options("/v1/completions", headers={"Origin": UI, **PREFLIGHT})
            assert reply.status_code == 405 and "access-control-allow-origin" not in reply.headers
            reply = await http.get("/v1/models", headers={"Origin": UI})
            assert reply.status_code == 200 and "access-control-allow-origin" not in reply.headers

    run(scenario)


def test_the_flag() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--allowed-origins", UI, "http://localhost:3000", "*"]))
    assert config.allowed_origins == (UI, "http://localhost:3000", "*")
    assert config_from_args(parser.parse_args([])).allowed_origins == ()
    for bad in ("ui.example.com", "https://ui.example.com/path", "ftp://x"):
        with pytest.raises(SystemExit, match="is not \\* or an origin"):
            config_from_args(parser.parse_args(["--allowed-origins", bad]))
