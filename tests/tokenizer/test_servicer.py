"""The Tokenizer service over real gRPC: the in-process server on a free port, called
through the generated stub."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from transformers import PreTrainedTokenizerBase

from pagedserve.common.grpc_utils import health_check
from pagedserve.tokenizer.detokenizer import REPLACEMENT_CHAR
from pagedserve.tokenizer.servicer import SERVICE_NAME
from pagedserve.v1 import tokenizer_pb2 as pb
from pagedserve.v1 import tokenizer_pb2_grpc


@pytest.fixture(scope="module")
def channel(grpc_server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(grpc_server.address) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.Channel) -> tokenizer_pb2_grpc.TokenizerStub:
    return tokenizer_pb2_grpc.TokenizerStub(channel)


@pytest.fixture
def hf(grpc_server) -> PreTrainedTokenizerBase:
    """The served tokenizer's transformers object, to compute expected answers with."""
    return grpc_server.tokenizer.hf


def expect_invalid(call, request, *needles: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for needle in needles:
        assert needle in err.value.details()


def test_encode_text_and_decode(stub: tokenizer_pb2_grpc.TokenizerStub, hf: PreTrainedTokenizerBase) -> None:
    text = "café naïve 👩‍💻🎉 你好世界"
    reply = stub.Encode(pb.EncodeRequest(text=text, add_special_tokens=True), timeout=10)
    assert list(reply.token_ids) == hf.encode(text, add_special_tokens=True)
    assert reply.token_ids[0] == hf.bos_token_id
    assert reply.rendered_text == text and list(reply.token_strs) == []
    spelled = stub.Encode(
        pb.EncodeRequest(text=text, add_special_tokens=True, return_token_strs=True), timeout=10
    )
    assert list(spelled.token_strs) == hf.convert_ids_to_tokens(list(reply.token_ids))
    assert spelled.token_strs[0] == "<|bos|>" and len(spelled.token_strs) == len(reply.token_ids)
    plain = stub.Encode(pb.EncodeRequest(text=text), timeout=10)
    assert list(plain.token_ids) == list(reply.token_ids[1:])
    decoded = stub.Decode(pb.DecodeRequest(token_ids=reply.token_ids, skip_special_tokens=True), timeout=10)
    assert decoded.text == text
    raw = stub.Decode(pb.DecodeRequest(token_ids=reply.token_ids), timeout=10)
    assert raw.text == "<|bos|>" + text


def test_encode_chat(stub: tokenizer_pb2_grpc.TokenizerStub, hf: PreTrainedTokenizerBase) -> None:
    messages = [
        pb.ChatMessage(role="system", content="Be brief."),
        pb.ChatMessage(role="user", content="你好"),
    ]
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    for add_generation_prompt in (True, False):
        chat = pb.ChatMessages(messages=messages, add_generation_prompt=add_generation_prompt)
        reply = stub.Encode(pb.EncodeRequest(chat=chat), timeout=10)
        expected = hf.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert reply.rendered_text == expected
        assert list(reply.token_ids) == hf.encode(expected, add_special_tokens=False)


def test_detokenize_two_interleaved_sequences(
    stub: tokenizer_pb2_grpc.TokenizerStub, hf: PreTrainedTokenizerBase
) -> None:
    texts = {"req-1/0": "👩‍💻🎉 café naïve", "req-2/0": "你好世界! done"}
    ids = {key: hf.encode(text, add_special_tokens=False) for key, text in texts.items()}
    eos = hf.eos_token_id
    requests: queue.Queue[pb.DetokenizeRequest | None] = queue.Queue()
    responses = stub.Detokenize(iter(requests.get, None), timeout=30)
    got: dict[str, list[str]] = {key: [] for key in texts}
    longest = max(len(v) for v in ids.values())
    for step in range(longest + 1):
        items = []
        for key, seq in ids.items():
            if step < len(seq):
                items.append(pb.DetokenizeItem(key=key, token_ids=[seq[step]], skip_special_tokens=True))
            elif step == len(seq):  # the last item: EOS (skipped) and finish
                items.append(
                    pb.DetokenizeItem(key=key, token_ids=[eos], finish=True, skip_special_tokens=True)
                )
        requests.put(pb.DetokenizeRequest(items=items))
        reply = next(responses)  # one response per request, one delta per item, in order
        assert [d.key for d in reply.deltas] == [i.key for i in items]
        for delta in reply.deltas:
            assert REPLACEMENT_CHAR not in delta.text
            got[delta.key].append(delta.text)
    requests.put(None)
    assert list(responses) == []
    assert {key: "".join(parts) for key, parts in got.items()} == texts


def test_detokenize_prompt_finish_and_reuse_of_a_key(
    stub: tokenizer_pb2_grpc.TokenizerStub, hf: PreTrainedTokenizerBase
) -> None:
    prompt = hf.encode("Say hi:", add_special_tokens=True)
    gen = hf.encode(" hi 🎉", add_special_tokens=False)
    requests = [
        pb.DetokenizeRequest(items=[pb.DetokenizeItem(key="a", prompt_token_ids=prompt)]),
        pb.DetokenizeRequest(items=[pb.DetokenizeItem(key="a", token_ids=gen, finish=True)]),
        # Same key after finish: a new sequence, and the same key twice in one request.
        pb.DetokenizeRequest(
            items=[
                pb.DetokenizeItem(key="a", token_ids=gen[:1]),
                pb.DetokenizeItem(key="a", token_ids=gen[1:]),
            ]
        ),
    ]
    replies = list(stub.Detokenize(iter(requests), timeout=10))
    first = hf.decode(gen[:1])
    assert [[d.text for d in r.deltas] for r in replies] == [
        [""],
        [" hi 🎉"],
        [first, " hi 🎉"[len(first) :]],
    ]


def test_info(stub: tokenizer_pb2_grpc.TokenizerStub, hf: PreTrainedTokenizerBase, grpc_server) -> None:
    info = stub.Info(pb.TokenizerInfoRequest(), timeout=10)
    assert info.model == grpc_server.tokenizer.model.rsplit("/", 1)[-1]
    assert info.vocab_size == len(hf)
    assert list(info.eos_token_ids) == [hf.eos_token_id, hf.convert_tokens_to_ids("<|end|>")]
    assert info.bos_token_id == hf.bos_token_id
    assert info.has_chat_template
    assert info.max_input_bytes == 1000


def test_health_and_reflection(grpc_server, channel: grpc.Channel) -> None:
    assert health_check(grpc_server.address)
    assert health_check(grpc_server.address, SERVICE_NAME)
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    replies = reflection.ServerReflectionInfo(iter([request]), timeout=10)
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def test_invalid_arguments(stub: tokenizer_pb2_grpc.TokenizerStub, hf: PreTrainedTokenizerBase) -> None:
    vocab = len(hf)
    expect_invalid(stub.Decode, pb.DecodeRequest(token_ids=[1, vocab]), f"{vocab}", f"[0, {vocab})")
    expect_invalid(stub.Decode, pb.DecodeRequest(token_ids=[-3]), "-3", f"[0, {vocab})")
    expect_invalid(stub.Decode, pb.DecodeRequest(), "token_ids is empty")
    expect_invalid(stub.Encode, pb.EncodeRequest(), "neither text nor chat")
    expect_invalid(stub.Encode, pb.EncodeRequest(text=""), "text is empty")
    expect_invalid(stub.Encode, pb.EncodeRequest(text="x" * 1001), "1001 bytes", "limit of 1000 bytes")
    expect_invalid(stub.Encode, pb.EncodeRequest(chat=pb.ChatMessages()), "chat.messages is empty")
    tool = pb.ChatMessages(messages=[pb.ChatMessage(role="tool", content="42")])
    expect_invalid(stub.Encode, pb.EncodeRequest(chat=tool), "role must be")


@pytest.mark.parametrize(
    "item",
    [
        pb.DetokenizeItem(key="k", token_ids=[10**6]),
        pb.DetokenizeItem(key="k", prompt_token_ids=[-1]),
        pb.DetokenizeItem(key="", token_ids=[5]),
    ],
    ids=["token_out_of_vocab", "prompt_out_of_vocab", "empty_key"],
)
def test_detokenize_bad_item_ends_the_stream(stub: tokenizer_pb2_grpc.TokenizerStub, item) -> None:
    good = pb.DetokenizeRequest(items=[pb.DetokenizeItem(key="ok", token_ids=[40])])
    responses = stub.Detokenize(iter([good, pb.DetokenizeRequest(items=[item])]), timeout=10)
    assert len(next(responses).deltas) == 1
    with pytest.raises(grpc.RpcError) as err:
        next(responses)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_detokenize_prompt_only_on_first_item(stub: tokenizer_pb2_grpc.TokenizerStub) -> None:
    requests = [
        pb.DetokenizeRequest(items=[pb.DetokenizeItem(key="k", token_ids=[40])]),
        pb.DetokenizeRequest(items=[pb.DetokenizeItem(key="k", prompt_token_ids=[40])]),
    ]
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Detokenize(iter(requests), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "only taken on its first item" in err.value.details()
