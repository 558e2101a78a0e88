"""vLLM's chat options in the gateway: `chat_template_kwargs` and `continue_final_message` from an
HTTP body (chat completions and /tokenize), the gRPC API and the SDK, up to the tokenizer call
(the template's rendering is in tests/tokenizer/test_chat_template_options.py; the real stack in
tests/e2e/test_endpoints.py)."""

from __future__ import annotations

import json

import httpx
import pytest
from gateway_fakes import FakeScheduler, FakeTokenizer
from gateway_harness import assert_error, run, serving

from pagedserve.client import build_request, build_tokenize_request
from pagedserve.common.errors import InvalidArgument
from pagedserve.gateway.grpc_service import prompt_from_proto, request_from_proto
from pagedserve.gateway.openai_request import parse_chat
from pagedserve.v1 import gateway_pb2, tokenizer_pb2

USER = {"role": "user", "content": "hi"}
BEGUN = {"role": "assistant", "content": "def f("}


def test_chat_body_options() -> None:
    prompt = parse_chat({"messages": [USER]}).request.prompt
    assert (prompt.add_generation_prompt, prompt.continue_final_message, prompt.template_kwargs_json) == (
        True,
        False,
        "",
    )
    body = {
        "messages": [USER, BEGUN],
        "continue_final_message": True,
        "chat_template_kwargs": {"enable_thinking": False},
    }
    prompt = parse_chat(body).request.prompt
    assert prompt.continue_final_message and not prompt.add_generation_prompt  # false unless asked for
    assert json.loads(prompt.template_kwargs_json) == {"enable_thinking": False}
    both = {**body, "add_generation_prompt": True}
    with pytest.raises(InvalidArgument, match="add_generation_prompt must be false") as err:
        parse_chat(both)
    assert err.value.field == "continue_final_message"


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"chat_template": "{{ 1 }}"}, "chat_template_kwargs may not set 'chat_template'"),
        ({"add_generation_prompt": False}, "may not set 'add_generation_prompt'"),
        ({"conversations": []}, "may not set 'conversations'"),
        (
            {
                "deep": [
                    [
                        [
                            [
                                [
                                    [
                                        [
                                            [
                                                [
                                                    [
                                                        [
                                                            [
                                                                [
                                                                    [
                                                                        [
                                                                            [
                                                                                [
                                                                                    [
                                                                                        [
                                                                                            [
                                                                                                [
                                                                                                    [
                                                                                                        [
                                                                                                            [
                                                                                                                [
                                                                                                                    [
                                                                                                                        [
                                                                                                                            [
                                                                                                                                [
                                                                                                                                    [
                                                                                                                                        [
                                                                                                                                            [
                                                                                                                                                [
                                                                                                                                                    [
                                                                                                                                                        [
                                                                                                                                                            [
                                                                                                                                                                [
                                                                                                                                                                    [
                                                                                                                                                                        [
                                                                                                                                                                            [
                                                                                                                                                                                [
                                                                                                                                                                                    [
                                                                                                                                                                                        [
                                                                                                                                                                                            [
                                                                                                                                                                                                [
                                                                                                                                                                                                    [
                                                                                                                                                                                                        [
                                                                                                                                                                                                            [
                                                                                                                                                                                                                [
                                                                                                                                                                                                                    [
                                                                                                                                                                                                                        [
                                                                                                                                                                                                                            [
                                                                                                                                                                                                                                [
                                                                                                                                                                                                                                    [
                                                                                                                                                                                                                                        [
                                                                                                                                                                                                                                            [
                                                                                                                                                                                                                                                [
                                                                                                                                                                                                                                                    [
                                                                                                                                                                                                                                                        [
                                                                                                                                                                                                                                                            [
                                                                                                                                                                                                                                                                [
                                                                                                                                                                                                                                                                    [
                                                                                                                                                                                                                                                                        [
                                                                                                                                                                                                                                                                            []
                                                                                                                                                                                                                                                                        ]
                                                                                                                                                                                                                                                                    ]
                                                                                                                                                                                                                                                                ]
                                                                                                                                                                                                                                                            ]
                                                                                                                                                                                                                                                        ]
                                                                                                                                                                                                                                                    ]
                                                                                                                                                                                                                                                ]
                                                                                                                                                                                                                                            ]
                                                                                                                                                                                                                                        ]
                                                                                                                                                                                                                                    ]
                                                                                                                                                                                                                                ]
                                                                                                                                                                                                                            ]
                                                                                                                                                                                                                        ]
                                                                                                                                                                                                                    ]
                                                                                                                                                                                                                ]
                                                                                                                                                                                                            ]
                                                                                                                                                                                                        ]
                                                                                                                                                                                                    ]
                                                                                                                                                                                                ]
                                                                                                                                                                                            ]
                                                                                                                                                                                        ]
                                                                                                                                                                                    ]
                                                                                                                                                                                ]
                                                                                                                                                                            ]
                                                                                                                                                                        ]
                                                                                                                                                                    ]
                                                                                                                                                                ]
                                                                                                                                                            ]
                                                                                                                                                        ]
                                                                                                                                                    ]
                                                                                                                                                ]
                                                                                                                                            ]
                                                                                                                                        ]
                                                                                                                                    ]
                                                                                                                                ]
                                                                                                                            ]
                                                                                                                        ]
                                                                                                                    ]
                                                                                                                ]
                                                                                                            ]
                                                                                                        ]
                                                                                                    ]
                                                                                                ]
                                                                                            ]
                                                                                        ]
                                                                                    ]
                                                                                ]
                                                                            ]
                                                                        ]
                                                                    ]
                                                                ]
                                                            ]
                                                        ]
                                                    ]
                                                ]
                                            ]
                                        ]
                                    ]
                                ]
                            ]
                        ]
                    ]
                ]
            },
            "nests arrays or objects more than 64",
        ),
        ({"a b": 1}, "is not a template variable name"),
        ("enable_thinking", "chat_template_kwargs must be an object of template variables"),
        ([], "chat_template_kwargs must be an object"),
    ],
)
def test_bad_template_kwargs_name_the_field(kwargs, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words) as err:
        parse_chat({"messages": [USER], "chat_template_kwargs": kwargs})
    assert err.value.field == "chat_template_kwargs"


def test_grpc_chat_defaults_and_options() -> None:
    chat = tokenizer_pb2.ChatMessages(messages=[tokenizer_pb2.ChatMessage(role="user", content="hi")])
    # unset add_generation_prompt means true, as the proto says
    assert request_from_proto(gateway_pb2.GenerateRequest(chat=chat)).prompt.add_generation_prompt
    chat.continue_final_message = True
    chat.chat_template_kwargs_json = '{"enable_thinking": true}'
    prompt = prompt_from_proto(gateway_pb2.TokenizePromptRequest(chat=chat))
    assert prompt.continue_final_message and not prompt.add_generation_prompt
    assert json.loads(prompt.template_kwargs_json) == {"enable_thinking": True}
    chat.chat_template_kwargs_json = '{"tokenize": true}'
    with pytest.raises(InvalidArgument, match="may not set 'tokenize'") as err:
        prompt_from_proto(gateway_pb2.TokenizePromptRequest(chat=chat))
    assert err.value.field == "chat.chat_template_kwargs_json"


def test_sdk_builds_and_checks_the_options() -> None:
    msg = build_request(
        messages=[USER, BEGUN], continue_final_message=True, chat_template_kwargs={"x": [1, 2]}
    )
    assert msg.chat.continue_final_message and not msg.chat.HasField("add_generation_prompt")
    assert json.loads(msg.chat.chat_template_kwargs_json) == {"x": [1, 2]}
    assert build_request(messages=[USER], add_generation_prompt=False).chat.HasField("add_generation_prompt")
    tokenize = build_tokenize_request(messages=[USER], chat_template_kwargs={"enable_thinking": False})
    assert tokenize.chat.chat_template_kwargs_json == '{"enable_thinking":false}'
    for kwargs, words in [
        ({"chat_template": ""}, "may not set 'chat_template'"),
        ({"x": {1, 2}}, "chat_template_kwargs must hold JSON values"),
    ]:
        with pytest.raises(InvalidArgument, match=words):
            build_request(messages=[USER], chat_template_kwargs=kwargs)
    with pytest.raises(InvalidArgument, match="continue_final_message must be true or false"):
        build_request(messages=[USER], continue_final_message="yes")
    for options in (
        {"continue_final_message": True},
        {"add_generation_prompt": False},
        {"chat_template_kwargs": {}},
    ):
        with pytest.raises(InvalidArgument, match="goes with messages=, not a text prompt"):
            build_request("hi", **options)
        with pytest.raises(InvalidArgument, match="goes with messages=, not a text prompt"):
            build_tokenize_request("hi", **options)


def test_http_chat_and_tokenize_pass_the_options_to_the_tokenizer() -> None:
    async def scenario() -> None:
        scheduler, tokenizer = FakeScheduler(["ok"]), FakeTokenizer()
        async with serving(scheduler, tokenizer) as (url, _), httpx.AsyncClient(base_url=url) as http:
            body = {
                "messages": [USER, BEGUN],
                "continue_final_message": True,
                "chat_template_kwargs": {"enable_thinking": False},
                "max_tokens": 2,
            }
            reply = await http.post("/v1/chat/completions", json=body)
            assert reply.status_code == 200, reply.text
            del body["max_tokens"]
            assert (await http.post("/tokenize", json=body)).status_code == 200
            for prompt in tokenizer.encoded:
                assert prompt.continue_final_message and not prompt.add_generation_prompt
                assert json.loads(prompt.template_kwargs_json) == {"enable_thinking": False}
            # the variables count toward the tokenizer's input limit (1,000 bytes here), and the
            # error names them when they are the biggest part
            big = {"messages": [USER], "chat_template_kwargs": {"notes": "x" * 1000}}
            assert_error(
                await http.post("/tokenize", json=big),
                400,
                "more than the limit of 1000",
                "chat_template_kwargs",
            )
            text = {"prompt": "x", "continue_final_message": True}
            assert_error(
                await http.post("/tokenize", json=text),
                400,
                "it goes with messages",
                "continue_final_message",
            )
            refused = {"messages": [USER], "chat_template_kwargs": {"chat_template": "{{ 7 * 7 }}"}}
            for path in ("/tokenize", "/v1/chat/completions"):
                assert_error(await http.post(path, json=refused), 400, "may not set", "chat_template_kwargs")
        assert len(tokenizer.encoded) == 2 and len(scheduler.submitted) == 1

    run(scenario)
