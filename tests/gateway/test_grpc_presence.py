"""The public gRPC API and the SDK: field presence (0 is not "unset"), ranges, names and the
API key, through a real grpc.aio server in process with the engine's downstream stand-ins."""

from __future__ import annotations

import asyncio

import pytest
from gateway_fakes import FakeScheduler
from gateway_harness import MODEL, grpc_gateway

from pagedserve.client import AsyncClient, Unauthenticated, build_request
from pagedserve.common import errors
from pagedserve.gateway.config import RequestLimits
from pagedserve.gateway.grpc_service import request_from_proto
from pagedserve.v1 import common_pb2, gateway_pb2


def test_unset_fields_take_defaults_and_zero_stays_zero() -> None:
    unset = request_from_proto(gateway_pb2.GenerateRequest(text="x")).sampling
    assert (unset.max_tokens, unset.n, unset.temperature, unset.top_p, unset.seed) == (16, 1, 1.0, 1.0, None)
    zeros = request_from_proto(
        gateway_pb2.GenerateRequest(
            text="x", sampling=gateway_pb2.GenerateSamplingParams(max_tokens=0, n=0, temperature=0, seed=0)
        )
    ).sampling
    assert (zeros.max_tokens, zeros.n, zeros.temperature, zeros.seed) == (0, 0, 0.0, 0)


def test_wire_compatible_with_common_sampling_params() -> None:
    """A client built on the old proto (common.SamplingParams in field 5) still works."""
    old = common_pb2.SamplingParams(
        max_tokens=5, temperature=0.5, n=2, seed=7, stop_token_ids=[3], min_tokens=1
    )
    new = gateway_pb2.GenerateSamplingParams.FromString(old.SerializeToString())
    assert (new.max_tokens, new.temperature, new.n, new.seed, list(new.stop_token_ids), new.min_tokens) == (
        5,
        0.5,
        2,
        7,
        [3],
        1,
    )
    # proto3 without presence never sends a 0: an old client's max_tokens=0 still means 16.
    assert not gateway_pb2.GenerateSamplingParams.FromString(
        common_pb2.SamplingParams(max_tokens=0).SerializeToString()
    ).HasField("max_tokens")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be >= 1, got 0"),
        ({"n": 0}, "n must be >= 1, got 0"),
        ({"n": 129}, "n must be <= 128 (the gateway's --max-n), got 129"),
        ({"stop": [f"s{i}" for i in range(65)]}, "stop has 65 strings, more than the limit of 64"),
        ({"stop": ["x" * 4097]}, "stop strings are 4097 characters in all, more than the limit of 4096"),
        ({"model": "tiny-py"}, f"model 'tiny-py' is not served here; served models: '{MODEL}'"),
    ],
)
def test_invalid_values_over_grpc_are_refused_before_submit(kwargs: dict, message: str) -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["ok"])
        async with grpc_gateway(scheduler) as address, AsyncClient(address, timeout=10) as client:
            error = errors.NotFound if "model" in kwargs else errors.InvalidArgument
            with pytest.raises(error) as info:
                await client.generate("x", **kwargs)
            assert info.value.message == message
            assert info.value.code == ("NOT_FOUND" if "model" in kwargs else "INVALID_ARGUMENT")
            with pytest.raises(error):
                async for _ in client.stream("x", **kwargs):
                    pass
        assert scheduler.submitted == []

    asyncio.run(scenario())


def test_served_names_over_grpc() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["ok"])
        names = ("org/tiny", "tiny-py")
        async with (
            grpc_gateway(scheduler, served_model_names=names) as address,
            AsyncClient(address, timeout=10) as client,
        ):
            assert [(m.id, m.root) for m in await client.models()] == [
                ("org/tiny", MODEL),
                ("tiny-py", MODEL),
            ]
            result = await client.generate("x", model="tiny-py", max_tokens=2)
            assert result.model == "org/tiny" and result.choices[0].text == "ok"

    asyncio.run(scenario())


def test_api_key_over_grpc() -> None:
    async def scenario() -> None:
        scheduler = FakeScheduler(["ok"])
        async with grpc_gateway(scheduler, api_key="s3cret") as address:
            async with AsyncClient(address, timeout=10, api_key="") as client:
                with pytest.raises(Unauthenticated) as info:
                    await client.generate("x", max_tokens=2)
                assert info.value.code == "UNAUTHENTICATED"
                assert info.value.message == "missing API key: send 'Authorization: Bearer <key>'"
                with pytest.raises(Unauthenticated):
                    await client.models()
                with pytest.raises(Unauthenticated):
                    await client.tokenize("x")
                with pytest.raises(Unauthenticated):
                    await client.detokenize([5])
            async with AsyncClient(address, timeout=10, api_key="wrong") as client:
                with pytest.raises(Unauthenticated, match="invalid API key"):
                    async for _ in client.stream("x", max_tokens=2):
                        pass
            async with AsyncClient(address, timeout=10, api_key="s3cret") as client:
                assert (await client.generate("x", max_tokens=2)).choices[0].text == "ok"
                # the stand-in tokenizer: BOS (1), then each character's code point
                assert (await client.tokenize("hi")).token_ids == [1, ord("h"), ord("i")]
                assert await client.detokenize([1, ord("o"), ord("k")]) == "ok"
        assert len(scheduler.submitted) == 1

    asyncio.run(scenario())


def test_sdk_api_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with grpc_gateway(FakeScheduler(["ok"]), api_key="from-env") as address:
            async with AsyncClient(address, timeout=10) as client:
                assert (await client.generate("x", max_tokens=2)).choices[0].text == "ok"

    monkeypatch.setenv("PAGEDSERVE_API_KEY", "from-env")
    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        (
            {"seed": 2**64},
            "seed",
            "seed must be in [-9223372036854775808, 9223372036854775807] (a 64-bit integer)",
        ),
        ({"priority": 2**31}, "priority", "priority must be in [-2147483648, 2147483647] (a 32-bit integer)"),
        ({"max_tokens": 2**31}, "max_tokens", "got 2147483648"),
        ({"n": 2**40}, "n", "(a 32-bit integer), got 1099511627776"),
        ({"stop_token_ids": [1, 2**31]}, "stop_token_ids", "stop_token_ids must be in [-2147483648"),
        ({"token_ids": [1, 2**32]}, "token_ids", "token_ids must be in"),
        ({"temperature": float("nan")}, "temperature", "temperature must be a finite number"),
        ({"top_p": 1e39}, "top_p", "top_p must be at most 3.403e+38 in size"),
        ({"max_tokens": "8"}, "max_tokens", "max_tokens must be an integer"),
        ({"ignore_eos": 1}, "ignore_eos", "ignore_eos must be true or false"),
        (
            {"prompt": "a\ud800"},
            "prompt",
            "prompt is not valid Unicode: a lone surrogate \\ud800 at character 1",
        ),
        ({"messages": [{"role": "user", "content": "\udfff"}]}, "messages.content", "not valid Unicode"),
        ({"messages": [{"content": "hi"}]}, "messages.role", "messages[0] must be a dict with a role"),
        ({"messages": ["hi"]}, "messages.role", "messages[0] must be a dict with a role"),
        (
            {"messages": [{"role": "user", "content": ["a"]}]},
            "messages.content",
            "must be a string, got list",
        ),
        ({"stop": ["\ud800"]}, "stop", "stop is not valid Unicode"),
    ],
)
def test_sdk_refuses_values_protobuf_cannot_carry(kwargs: dict, field: str, message: str) -> None:
    if "token_ids" not in kwargs and "messages" not in kwargs:
        kwargs.setdefault("prompt", "x")
    prompt = kwargs.pop("prompt", None)
    with pytest.raises(errors.InvalidArgument) as info:
        build_request(prompt, **kwargs)
    assert info.value.field == field and message in info.value.message


def test_sdk_takes_a_message_without_content_as_http_does() -> None:
    (message,) = build_request(messages=[{"role": "user"}]).chat.messages
    assert (message.role, message.content) == ("user", "")


def test_sdk_sends_only_the_fields_given() -> None:
    msg = build_request("x", max_tokens=0, seed=2**63 - 1, temperature=0)
    assert msg.sampling.HasField("max_tokens") and msg.sampling.max_tokens == 0
    assert msg.sampling.HasField("temperature") and not msg.sampling.HasField("n")
    assert not build_request("x").sampling.HasField("max_tokens")
    assert not build_request("x", logprobs=None).sampling.HasField("logprobs")
    with pytest.raises(TypeError, match="unknown sampling argument: beam_width"):
        build_request("x", beam_width=2)


def test_engine_limits_apply_to_grpc_requests_too() -> None:
    from gateway_fakes import collect, make_engine, text_request

    engine, _ = make_engine(FakeScheduler(["ok"]), limits=RequestLimits(max_n=2))
    with pytest.raises(errors.InvalidArgument, match=r"n must be <= 2 \(the gateway's --max-n\), got 3"):
        asyncio.run(collect(engine, text_request("x", n=3)))
