"""The chat template's options besides messages and tools: `chat_template_kwargs` (extra template
variables, with the names that would reach apply_chat_template itself refused),
`continue_final_message`, and `--chat-template` (a template in place of the model's)."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from pagedserve.common.chat_template import MAX_TEMPLATE_KWARGS, RESERVED_TEMPLATE_KWARGS
from pagedserve.common.errors import InvalidArgument
from pagedserve.tokenizer.core import ChatMessage, ServedTokenizer, read_chat_template
from pagedserve.tokenizer.server import TokenizerConfig, add_arguments
from pagedserve.v1 import tokenizer_pb2 as pb
from pagedserve.v1 import tokenizer_pb2_grpc

# A template that reads a variable of its own, as Qwen3's reads `enable_thinking`.
THINKING_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif %}"
)
CHAT = [ChatMessage("user", "Square x.")]


@pytest.fixture
def thinking(bundled_model_path: str, tmp_path: Path) -> ServedTokenizer:
    path = tmp_path / "thinking.jinja"
    path.write_text(THINKING_TEMPLATE)
    return ServedTokenizer.load(bundled_model_path, chat_template=str(path))


def test_template_kwargs_reach_the_template(thinking: ServedTokenizer) -> None:
    conversation = [{"role": "user", "content": "Square x."}]
    off = thinking.encode(CHAT, template_kwargs={"enable_thinking": False})
    assert off.rendered_text == thinking.hf.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert off.rendered_text.endswith("<|assistant|>\n<think></think>")
    on = thinking.encode(CHAT, template_kwargs={"enable_thinking": True})
    assert (
        on.rendered_text.endswith("<|assistant|>\n")
        and thinking.encode(CHAT).rendered_text == on.rendered_text
    )
    assert off.token_ids == thinking.hf.encode(off.rendered_text, add_special_tokens=False)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"chat_template": "{{ 7 * 7 }}"}, "may not set 'chat_template'"),
        ({"tokenize": True}, "may not set 'tokenize'"),
        ({"messages": []}, "may not set 'messages'"),
        ({"1st": 1}, "is not a template variable name"),
        ({"a-b": 1}, "is not a template variable name"),
        (
            {f"k{i}": i for i in range(MAX_TEMPLATE_KWARGS + 1)},
            f"more than the limit of {MAX_TEMPLATE_KWARGS}",
        ),
        (["enable_thinking"], "must be an object of template variables"),
    ],
)
def test_template_kwargs_that_are_refused(thinking: ServedTokenizer, kwargs, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words) as err:
        thinking.encode(CHAT, template_kwargs=kwargs)
    assert err.value.field == "chat.chat_template_kwargs_json"


def test_every_apply_chat_template_parameter_is_reserved(thinking: ServedTokenizer) -> None:
    """A kwarg named like one of apply_chat_template's parameters would set that parameter."""
    import inspect

    parameters = set(inspect.signature(type(thinking.hf).apply_chat_template).parameters) - {"self", "kwargs"}
    assert parameters <= RESERVED_TEMPLATE_KWARGS, parameters - RESERVED_TEMPLATE_KWARGS


def test_continue_final_message(bundled_model_path: str) -> None:
    served = ServedTokenizer.load(bundled_model_path)
    chat = [ChatMessage("user", "Write f."), ChatMessage("assistant", "def f(")]
    conversation = [{"role": m.role, "content": m.content} for m in chat]
    encoding = served.encode(chat, continue_final_message=True)  # add_generation_prompt defaults to false
    assert encoding.rendered_text == served.hf.apply_chat_template(
        conversation, tokenize=False, continue_final_message=True
    )
    assert encoding.rendered_text.endswith("<|assistant|>\ndef f(")
    assert served.encode(chat).rendered_text.endswith("def f(<|end|>\n<|assistant|>\n")
    with pytest.raises(InvalidArgument, match="add_generation_prompt must be false") as err:
        served.encode(chat, continue_final_message=True, add_generation_prompt=True)
    assert err.value.field == "continue_final_message"


def test_read_chat_template(tmp_path: Path) -> None:
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert read_chat_template(str(path)) == path.read_text()
    assert read_chat_template("{{ messages[0].content }}") == "{{ messages[0].content }}"
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        read_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match=r"does not parse: .* \(line 1\)"):
        read_chat_template("{% for m in messages %}{{ m.content }}")
    # inline, as vLLM reads it: escapes decoded (a one-line template), long text is no file name
    long = "{% for m in messages %}" + "x" * 300 + "{{ m.content }}\\n{% endfor %}é你"
    assert read_chat_template(long) == long.replace("\\n", "\n")
    # transformers' own block tag parses
    generation = "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
    assert read_chat_template(generation) == generation


def test_chat_template_flag(bundled_model_path: str) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = TokenizerConfig.from_args(parser.parse_args(["--chat-template", THINKING_TEMPLATE]))
    assert config.chat_template == THINKING_TEMPLATE
    assert TokenizerConfig.from_args(parser.parse_args([])).chat_template == ""
    served = ServedTokenizer.load(bundled_model_path, chat_template=config.chat_template)
    assert served.hf.chat_template == THINKING_TEMPLATE


def test_the_service_takes_the_options(grpc_server) -> None:
    with grpc.insecure_channel(grpc_server.address) as channel:
        stub = tokenizer_pb2_grpc.TokenizerStub(channel)
        user, begun = (
            pb.ChatMessage(role="user", content="hi"),
            pb.ChatMessage(role="assistant", content="ab"),
        )
        reply = stub.Encode(
            pb.EncodeRequest(chat=pb.ChatMessages(messages=[user, begun], continue_final_message=True)),
            timeout=10,
        )
        assert reply.rendered_text.endswith("<|assistant|>\nab")
        kwargs = json.dumps({"unused_by_the_template": 1})
        reply = stub.Encode(
            pb.EncodeRequest(chat=pb.ChatMessages(messages=[user], chat_template_kwargs_json=kwargs)),
            timeout=10,
        )
        assert reply.rendered_text.endswith("<|assistant|>\n")
        for bad, words in [
            ("{", "chat.chat_template_kwargs_json is not valid JSON"),
            ('{"chat_template": "x"}', "may not set 'chat_template'"),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                stub.Encode(
                    pb.EncodeRequest(chat=pb.ChatMessages(messages=[user], chat_template_kwargs_json=bad)),
                    timeout=10,
                )
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            chat = pb.ChatMessages(
                messages=[user, begun], continue_final_message=True, add_generation_prompt=True
            )
            stub.Encode(pb.EncodeRequest(chat=chat), timeout=10)
        assert "add_generation_prompt must be false" in err.value.details()


def test_the_service_refuses_deep_json_fields(grpc_server) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    with grpc.insecure_channel(grpc_server.address) as channel:
        stub = tokenizer_pb2_grpc.TokenizerStub(channel)
        user = pb.ChatMessage(role="user", content="x")
        for chat, words in [
            (pb.ChatMessages(messages=[user], tools_json=deep), "chat.tools_json nests arrays or objects"),
            (
                pb.ChatMessages(messages=[user], chat_template_kwargs_json='{"a": ' + deep + "}"),
                "kwargs_json nests",
            ),
            (
                pb.ChatMessages(
                    messages=[
                        pb.ChatMessage(role="assistant", content="", tool_calls_json="[" * 65 + "]" * 65)
                    ]  # 65 deep, under 1,000 bytes
                ),
                "chat.messages.tool_calls_json nests",
            ),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                stub.Encode(pb.EncodeRequest(chat=chat), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()
