"""Sampling defaults from the model's generation_config.json (`--generation-config`): read and
checked at start, applied to the fields a request leaves out over HTTP and gRPC, never to beam
search, and never over a request's own value."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import httpx
import pytest
from gateway_fakes import FakeScheduler
from gateway_harness import grpc_gateway, run, serving

from pagedserve.client import AsyncClient
from pagedserve.gateway import generation_defaults
from pagedserve.gateway.flags import add_arguments, config_from_args
from pagedserve.gateway.grpc_service import request_from_proto
from pagedserve.gateway.openai_request import parse_chat, parse_completion
from pagedserve.v1 import gateway_pb2

# As Qwen ships it: do_sample and max_new_tokens are not sampling defaults and are not used.
QWEN_LIKE = {
    "bos_token_id": 1,
    "do_sample": True,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "repetition_penalty": 1.05,
    "max_new_tokens": 100,
}
DEFAULTS = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}


def model_folder(tmp_path: Path, config: dict) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    return str(tmp_path)


def parse_flags(*argv: str):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_load(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, QWEN_LIKE)
    assert generation_defaults.load("auto", folder) == DEFAULTS
    assert generation_defaults.load("vllm", folder) == {}
    assert generation_defaults.load("auto", "org/hub-id") == {}  # not a local folder: no file to read
    assert generation_defaults.load(folder, "org/hub-id") == DEFAULTS  # a folder of its own
    with pytest.raises(ValueError, match="no generation_config.json in that folder"):
        generation_defaults.load(str(tmp_path / "elsewhere"), folder)
    assert generation_defaults.load("auto", model_folder(tmp_path, {"top_k": -1})) == {"top_k": 0}


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"temperature": "hot"}, "temperature must be a number, got 'hot'"),
        ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
        ({"top_p": 0}, "top_p must be in (0, 1]"),
        ({"top_k": 2.5}, "top_k must be an integer, got 2.5"),
        ({"top_k": -2}, "top_k must be -1, 0 (disabled) or >= 1"),
        ({"temperature": 1e39}, "temperature must be at most 3.403e+38 in size"),
        ({"min_p": 2}, "min_p must be in [0, 1]"),
        ({"repetition_penalty": 0}, "repetition_penalty must be a finite number > 0"),
        ({"temperature": True}, "temperature must be a number"),
        ([1, 2], "must hold a JSON object"),
    ],
)
def test_bad_files_stop_the_gateway_naming_the_field(tmp_path: Path, config, words: str) -> None:
    folder = model_folder(tmp_path, config)
    with pytest.raises(SystemExit, match=re.escape(words)):
        parse_flags("--model", folder)
    assert parse_flags("--model", folder, "--generation-config", "vllm").sampling_defaults == {}


def test_a_hub_id_reads_the_local_cache_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert generation_defaults.load("auto", "org/tuned") == {}  # not cached: nothing, nothing fetched
    repo = tmp_path / "models--org--tuned"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    model_folder(repo / "snapshots" / "abc123", QWEN_LIKE)
    assert generation_defaults.load("auto", "org/tuned") == DEFAULTS


def test_flags_read_the_model_folder(tmp_path: Path) -> None:
    folder = model_folder(tmp_path, QWEN_LIKE)
    assert parse_flags("--model", folder).sampling_defaults == DEFAULTS
    assert parse_flags("--model", "org/name").sampling_defaults == {}


def test_http_bodies_take_the_defaults_for_what_they_leave_out() -> None:
    sampling = parse_completion({"prompt": "x"}, defaults=DEFAULTS).request.sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.repetition_penalty) == (
        0.7,
        0.8,
        20,
        1.05,
    )
    assert sampling.min_p == 0.0  # not in the file: the API's default
    own = parse_chat(
        {"messages": [{"role": "user", "content": "x"}], "temperature": 0, "top_k": 0}, defaults=DEFAULTS
    ).request.sampling
    assert (own.temperature, own.top_k, own.top_p) == (0.0, 0, 0.8)
    beam = parse_completion(
        {"prompt": "x", "use_beam_search": True, "n": 2}, defaults=DEFAULTS
    ).request.sampling
    assert (beam.temperature, beam.top_p, beam.top_k, beam.repetition_penalty) == (0.0, 1.0, 0, 1.0)
    plain = parse_completion({"prompt": "x"}).request.sampling
    assert (plain.temperature, plain.top_p, plain.top_k) == (1.0, 1.0, 0)


def test_grpc_requests_take_the_defaults_for_unset_fields() -> None:
    unset = request_from_proto(gateway_pb2.GenerateRequest(text="x"), DEFAULTS).sampling
    assert (unset.temperature, unset.top_p, unset.top_k, unset.repetition_penalty) == (0.7, 0.8, 20, 1.05)
    zero = gateway_pb2.GenerateRequest(
        text="x", sampling=gateway_pb2.GenerateSamplingParams(temperature=0, top_k=0)
    )
    own = request_from_proto(zero, DEFAULTS).sampling
    assert (own.temperature, own.top_k, own.top_p) == (0.0, 0, 0.8)
    beam = gateway_pb2.GenerateRequest(
        text="x", sampling=gateway_pb2.GenerateSamplingParams(use_beam_search=True, n=2)
    )
    assert request_from_proto(beam, DEFAULTS).sampling.top_p == 1.0


def test_the_servers_submit_the_defaults() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["ok"])
        async with serving(scheduler, sampling_defaults=DEFAULTS) as (url, _):
            async with httpx.AsyncClient(base_url=url) as http:
                reply = await http.post(
                    "/v1/completions", json={"prompt": "p", "max_tokens": 2, "top_p": 0.5}
                )
                assert reply.status_code == 200, reply.text
        async with grpc_gateway(scheduler, sampling_defaults=DEFAULTS) as address:
            async with AsyncClient(address) as client:
                await client.generate("p", max_tokens=2, temperature=0.0)
        (_, _, http_sampling), (_, _, grpc_sampling) = scheduler.submitted
        assert (http_sampling.temperature, http_sampling.top_p, http_sampling.top_k) == (0.7, 0.5, 20)
        assert (grpc_sampling.temperature, grpc_sampling.top_p, grpc_sampling.top_k) == (0.0, 0.8, 20)

    run(scenario)


def test_a_top_k_above_the_vocabulary_keeps_every_token() -> None:
    """As in vLLM, top_k at or above the vocabulary size (300 for the stand-in tokenizer) is the
    same as off, whether a request or the model's file sets it: no request is refused for a
    default it never sent."""

    async def scenario() -> None:
        scheduler = FakeScheduler(["ok"])
        async with serving(scheduler, sampling_defaults={"top_k": 50000}) as (url, _):
            async with httpx.AsyncClient(base_url=url) as http:
                for body in (
                    {"prompt": "p", "max_tokens": 2},
                    {"prompt": "p", "max_tokens": 2, "top_k": 301},
                ):
                    reply = await http.post("/v1/completions", json=body)
                    assert reply.status_code == 200, reply.text
        assert [s.top_k for _, _, s in scheduler.submitted] == [50000, 301]

    run(scenario)
