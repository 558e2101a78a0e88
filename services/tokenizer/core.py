"""The tokenizer core: a Hugging Face tokenizer behind validation, chat rendering and
incremental detokenization (`detokenizer.py`). No gRPC here; `servicer.py` is the edge.

Every id that enters is checked against `[0, vocab_size)` where `vocab_size` is
`len(tokenizer)` (base vocabulary plus added tokens); every text against a byte limit.
Bad input raises `InvalidArgument` naming the field and the limit.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import jinja2
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pagedserve.common.chat_template import (
    chat_bytes,
    chat_template_is_file,
    check_template_kwargs,
    generation_prompt,
    template_kwargs_to_json,
)
from pagedserve.common.errors import InvalidArgument
from pagedserve.common.json_text import load_json_text
from pagedserve.tokenizer.detokenizer import IncrementalDetokenizer

DEFAULT_MAX_INPUT_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One turn of a conversation; the chat template decides which roles are valid."""

    role: str
    content: str
    tool_calls_json: str = ""  # an assistant turn's calls: OpenAI's `tool_calls` list as JSON text
    tool_call_id: str = ""  # a tool turn: the call it answers
    name: str = ""  # a tool turn: the function's name

    def to_template(self) -> dict:
        """The message as chat templates read it. A call's `arguments` arrive as JSON text (OpenAI's
        form); templates index into them (`arguments.items()`, `arguments | tojson`), so a JSON
        object is handed over decoded."""
        message: dict = {"role": self.role, "content": self.content}
        if self.tool_calls_json:
            calls = load_json_text(self.tool_calls_json, "chat.messages.tool_calls_json")
            if not isinstance(calls, list):
                raise InvalidArgument(
                    "chat.messages.tool_calls_json must be a JSON list", field="chat.messages.tool_calls_json"
                )
            for call in calls:
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                    try:
                        arguments = load_json_text(function["arguments"], "arguments")
                    except InvalidArgument:
                        continue  # handed over as the text it is
                    if isinstance(arguments, dict):
                        function["arguments"] = arguments
            message["tool_calls"] = calls
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        if self.name:
            message["name"] = self.name
        return message


class Encoding(NamedTuple):
    token_ids: list[int]
    # The exact text that was tokenized: the input itself, or the rendered chat template.
    rendered_text: str


@dataclass(frozen=True, slots=True)
class ServedTokenizer:
    """A loaded tokenizer plus the facts about it that encoding and detokenizing need.

    Invariants: `vocab_size == len(hf)`; `skipped_ids` are exactly the ids that
    `hf.decode(..., skip_special_tokens=True)` drops; `byte_fallback_ids` are the 256
    `<0xNN>` tokens when the vocabulary has all of them, else empty; `cleans_up_spaces` is
    whether `hf.decode` applies transformers' `clean_up_tokenization` to its output.
    """

    hf: PreTrainedTokenizerBase
    model: str
    max_input_bytes: int
    vocab_size: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    skipped_ids: frozenset[int]
    byte_fallback_ids: frozenset[int]
    cleans_up_spaces: bool

    @classmethod
    def load(
        cls, model: str, *, max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES, chat_template: str = ""
    ) -> ServedTokenizer:
        """Load `AutoTokenizer.from_pretrained(model)` (a local folder or a hub id); `chat_template`
        (a file or the Jinja text itself, see `read_chat_template`) replaces the model's own."""
        hf = AutoTokenizer.from_pretrained(model)
        if chat_template:
            hf.chat_template = read_chat_template(chat_template)
        return cls.wrap(hf, model=model, max_input_bytes=max_input_bytes)

    @classmethod
    def wrap(
        cls, hf: PreTrainedTokenizerBase, *, model: str, max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES
    ) -> ServedTokenizer:
        """Serve an already loaded tokenizer; `model` is only its name."""
        if max_input_bytes < 1:
            raise InvalidArgument(
                f"max_input_bytes must be >= 1, got {max_input_bytes}", field="max_input_bytes"
            )
        vocab = hf.get_vocab()
        byte_ids = [vocab.get(f"<0x{b:02X}>") for b in range(256)]
        return cls(
            hf=hf,
            model=model,
            max_input_bytes=max_input_bytes,
            vocab_size=len(hf),
            bos_token_id=hf.bos_token_id,
            eos_token_ids=_eos_token_ids(hf, model),
            skipped_ids=_skipped_ids(hf),
            byte_fallback_ids=frozenset(byte_ids) if None not in byte_ids else frozenset(),  # type: ignore[arg-type]
            cleans_up_spaces=_cleans_up_spaces(hf),
        )

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    @property
    def chat_template_supports_tools(self) -> bool:
        """Whether the template reads the `tools` variable (a template that does not would drop
        the tools silently, and the model would never see them)."""
        template = getattr(self.hf, "chat_template", None)
        if isinstance(template, dict):  # named templates: the "tool_use" one, or the default
            template = template.get("tool_use") or template.get("default") or ""
        return bool(template) and re.search(r"\btools\b", template) is not None

    # -- validation ---------------------------------------------------------------------

    def check_text(self, text: str, field: str = "text") -> None:
        """Non-empty, valid UTF-8 and at most `max_input_bytes` bytes."""
        if not text:
            raise InvalidArgument(f"{field} is empty", field=field)
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise InvalidArgument(f"{field} is not valid UTF-8: {exc.reason}", field=field) from None
        if size > self.max_input_bytes:
            raise InvalidArgument(
                f"{field} is {size} bytes, over the limit of {self.max_input_bytes} bytes", field=field
            )

    def check_token_ids(
        self, token_ids: Sequence[int], field: str = "token_ids", *, allow_empty: bool = False
    ) -> None:
        """Every id in `[0, vocab_size)`; the message names the first bad id and the vocabulary size."""
        if not token_ids:
            if allow_empty:
                return
            raise InvalidArgument(f"{field} is empty", field=field)
        if min(token_ids) >= 0 and max(token_ids) < self.vocab_size:
            return
        index, bad = next((i, t) for i, t in enumerate(token_ids) if not 0 <= t < self.vocab_size)
        raise InvalidArgument(
            f"{field}[{index}] = {bad} is outside the vocabulary: ids must be in [0, {self.vocab_size})",
            field=field,
        )

    # -- encode / decode ----------------------------------------------------------------

    def encode(
        self,
        source: str | Sequence[ChatMessage],
        *,
        add_special_tokens: bool = False,
        add_generation_prompt: bool | None = None,
        tools: list[dict] | None = None,
        continue_final_message: bool = False,
        template_kwargs: dict | None = None,
    ) -> Encoding:
        """Token ids of plain text, or of a conversation rendered with the chat template.

        For text, `add_special_tokens` adds what the tokenizer's post-processor adds (e.g. BOS);
        for chat it is ignored, since the template writes every special token itself.
        """
        if isinstance(source, str):
            self.check_text(source)
            return Encoding(self.hf.encode(source, add_special_tokens=add_special_tokens), source)
        rendered = self.render_chat(
            source,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            continue_final_message=continue_final_message,
            template_kwargs=template_kwargs,
        )
        return Encoding(self.hf.encode(rendered, add_special_tokens=False), rendered)

    def render_chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        add_generation_prompt: bool | None = None,
        tools: list[dict] | None = None,
        continue_final_message: bool = False,
        template_kwargs: dict | None = None,
    ) -> str:
        """The conversation as text, through the tokenizer's chat template; `tools` (OpenAI's
        list) are handed to the template, which must support them; `template_kwargs` are extra
        template variables (checked by `chat_template.check_template_kwargs`); with
        `continue_final_message` the last message is left open for the model to continue."""
        if not self.has_chat_template:
            raise InvalidArgument(
                f"the tokenizer of {self.model} has no chat template: send text instead of chat messages",
                field="chat",
            )
        if not messages:
            raise InvalidArgument("chat.messages is empty", field="chat.messages")
        for i, message in enumerate(messages):
            if not message.role:
                raise InvalidArgument(f"chat.messages[{i}].role is empty", field="chat.messages.role")
        content_bytes = chat_bytes(messages)
        template_kwargs = check_template_kwargs(template_kwargs or {}, "chat.chat_template_kwargs_json")
        if template_kwargs:
            content_bytes += len(template_kwargs_to_json(template_kwargs).encode())
        add_generation_prompt = generation_prompt(add_generation_prompt, continue_final_message)
        if content_bytes > self.max_input_bytes:  # before rendering a huge conversation
            raise InvalidArgument(
                f"chat is {content_bytes} bytes, over the limit of {self.max_input_bytes} bytes", field="chat"
            )
        if tools and not self.chat_template_supports_tools:
            raise InvalidArgument(
                f"the chat template of {self.model} does not support tools: send no tools", field="tools"
            )
        conversation = [m.to_template() for m in messages]
        try:
            rendered = self.hf.apply_chat_template(
                conversation,
                tools=tools or None,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **template_kwargs,
            )
        except Exception as exc:  # jinja2 errors, including the template's raise_exception()
            why = str(exc) if len(str(exc)) <= 300 else str(exc)[:297] + "..."  # some quote the whole chat
            raise InvalidArgument(f"the chat template rejected the messages: {why}", field="chat") from None
        self.check_text(rendered, field="chat")
        return rendered

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Exactly `hf.decode(token_ids, skip_special_tokens=...)`, after validation."""
        self.check_token_ids(token_ids)
        return self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def token_strs(self, token_ids: Sequence[int]) -> list[str]:
        """Each id's token as the vocabulary spells it (`hf.convert_ids_to_tokens`), after validation."""
        self.check_token_ids(token_ids, allow_empty=True)
        return [str(t) for t in self.hf.convert_ids_to_tokens(list(token_ids))]

    def detokenizer(
        self, prompt_token_ids: Sequence[int] = (), *, skip_special_tokens: bool = False
    ) -> IncrementalDetokenizer:
        """A fresh incremental detokenizer for one sequence (see `IncrementalDetokenizer`)."""
        return IncrementalDetokenizer.start(self, prompt_token_ids, skip_special_tokens=skip_special_tokens)

    def decode_raw(self, token_ids: list[int], skip_special_tokens: bool) -> str:
        """`hf.decode` without transformers' space clean-up, which the detokenizer applies itself."""
        return self.hf.decode(
            token_ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )


def read_chat_template(value: str) -> str:
    """The template that `--chat-template` names: a file's text, or `value` itself when it holds
    Jinja tags, its backslash escapes decoded as vLLM does (a template written on one line, `\\n`
    for a newline). A template that does not parse is a ValueError here, not an error on every chat."""
    if chat_template_is_file(value):
        text = Path(value).read_text(encoding="utf-8")
    else:
        text = value.encode("latin-1", "backslashreplace").decode("unicode_escape")
    try:
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(_without_generation_tags(text))
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"--chat-template does not parse: {err.message} (line {err.lineno})") from None
    return text


def _without_generation_tags(text: str) -> str:
    """transformers' own `{% generation %}` block tags, which plain Jinja does not know."""
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", text)


def _skipped_ids(hf: PreTrainedTokenizerBase) -> frozenset[int]:
    """Ids that `decode(..., skip_special_tokens=True)` drops, found by asking decode itself."""
    candidates = set(hf.all_special_ids) | set(getattr(hf, "added_tokens_decoder", {}))
    return frozenset(
        t
        for t in candidates
        if 0 <= t < len(hf) and hf.decode([t], skip_special_tokens=True) == "" and hf.decode([t]) != ""
    )


def _cleans_up_spaces(hf: PreTrainedTokenizerBase) -> bool:
    """Whether `hf.decode` runs `clean_up_tokenization` (transformers skips it for BPE models
    even when the flag is set), found by decoding a probe both ways."""
    if not getattr(hf, "clean_up_tokenization_spaces", False):
        return False
    probe = hf.encode("a . b , c", add_special_tokens=False)
    return hf.decode(probe) != hf.decode(probe, clean_up_tokenization_spaces=False)


def _eos_token_ids(hf: PreTrainedTokenizerBase, model: str) -> tuple[int, ...]:
    """The tokenizer's EOS, then any other end ids in a local `generation_config.json`."""
    ids: list[int] = [] if hf.eos_token_id is None else [hf.eos_token_id]
    config = Path(model) / "generation_config.json"
    if config.is_file():
        try:
            eos = json.loads(config.read_text()).get("eos_token_id")
        except (OSError, ValueError):
            eos = None
        for token in [eos] if isinstance(eos, int) else eos if isinstance(eos, list) else []:
            if isinstance(token, int) and token not in ids:
                ids.append(token)
    return tuple(ids)
