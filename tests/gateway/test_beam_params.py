"""Beam-search parameters at the edges: HTTP bodies, gRPC messages, the SDK, and the common
validation — what is accepted, the defaults, and each refusal naming its field."""

from __future__ import annotations

import pytest

from pagedserve.client import build_request
from pagedserve.common.errors import InvalidArgument
from pagedserve.common.params import SamplingParams
from pagedserve.gateway.config import RequestLimits
from pagedserve.gateway.grpc_service import request_from_proto
from pagedserve.gateway.openai_request import parse_chat, parse_completion


def test_http_beam_fields_and_defaults() -> None:
    call = parse_completion(
        {"prompt": "x", "n": 3, "use_beam_search": True, "length_penalty": 0.5, "early_stopping": "never"}
    )
    sampling = call.request.sampling
    assert (sampling.use_beam_search, sampling.n, sampling.length_penalty, sampling.early_stopping) == (
        True, 3, 0.5, "never",
    )  # fmt: skip
    assert sampling.temperature == 0.0  # beam search is greedy unless told otherwise
    sampling.validate()
    chat = parse_chat({"messages": [{"role": "user", "content": "x"}], "use_beam_search": True, "n": 2})
    assert chat.request.sampling.early_stopping is False and chat.request.sampling.length_penalty == 1.0
    assert (
        parse_completion(
            {"prompt": "x", "use_beam_search": True, "early_stopping": True}
        ).request.sampling.early_stopping
        is True
    )


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"stream": True}, "stream", "stream"),
        ({"n": 9}, "n", "--max-beam-width"),
        ({"early_stopping": "sometimes"}, "early_stopping", "never"),
        ({"early_stopping": 1}, "early_stopping", "never"),
        ({"length_penalty": "long"}, "length_penalty", "number"),
    ],
)
def test_http_beam_refusals(body: dict, field: str, words: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_completion(
            {"prompt": "x", "n": 2, "use_beam_search": True, **body}, RequestLimits(max_beam_width=8)
        )
    assert err.value.field == field and words in err.value.message


@pytest.mark.parametrize(("name", "value"), [("length_penalty", 2.0), ("early_stopping", True)])
def test_beam_fields_need_beam_search(name: str, value) -> None:
    """As vLLM: a beam-search field set to anything but its default needs use_beam_search."""
    parse_completion(
        {"prompt": "x", "length_penalty": 1.0, "early_stopping": False}
    ).request.sampling.validate()
    with pytest.raises(InvalidArgument) as err:
        parse_completion({"prompt": "x", name: value}).request.sampling.validate()
    assert err.value.field == name and "use_beam_search" in err.value.message
    with pytest.raises(InvalidArgument) as err:
        request_from_proto(build_request("x", **{name: value})).sampling.validate()
    assert err.value.field == name


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"temperature": 0.5}, "temperature"),
        ({"top_p": 0.9}, "top_p"),
        ({"top_k": 5}, "top_k"),
        ({"min_p": 0.1}, "min_p"),
        ({"repetition_penalty": 1.2}, "repetition_penalty"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"logprobs": 1}, "logprobs"),
        ({"min_tokens": 2}, "min_tokens"),
        ({"stop_token_ids": [5]}, "stop_token_ids"),
        ({"early_stopping": "maybe"}, "early_stopping"),
        ({"length_penalty": float("nan")}, "length_penalty"),
    ],
)
def test_unsupported_combinations_name_the_field(change: dict, field: str) -> None:
    params = SamplingParams(
        **{"max_tokens": 4, "temperature": 0.0, "n": 2, "use_beam_search": True, **change}
    )
    with pytest.raises(InvalidArgument) as err:
        params.validate()
    assert err.value.field == field and field in err.value.message


def test_grpc_and_sdk_carry_the_beam_fields() -> None:
    for es in (True, False, "never"):
        msg = build_request("x", n=4, use_beam_search=True, length_penalty=1.5, early_stopping=es)
        sampling = request_from_proto(msg).sampling
        assert (sampling.use_beam_search, sampling.n, sampling.length_penalty) == (True, 4, 1.5)
        assert sampling.early_stopping == es and sampling.temperature == 0.0
        assert SamplingParams.from_proto(sampling.to_proto()) == sampling  # scheduler/executor wire
    with pytest.raises(InvalidArgument) as err:
        build_request("x", use_beam_search=True, early_stopping="sometimes")
    assert err.value.field == "early_stopping"
