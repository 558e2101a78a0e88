"""A reasoning model's thinking, split from its answer (the gateway's `--reasoning-parser`).

Models such as DeepSeek-R1, QwQ and Qwen3 think aloud between `<think>` and `</think>` before
they answer. With a parser set, a chat choice's text is split there: the thinking goes to the
message's (or the stream delta's) `reasoning` field, as vLLM names it, and only the answer to
`content` (null when there is none yet). Tool calls are looked for in the answer only.

- `deepseek_r1`: everything up to the first `</think>` is thinking, whether or not the output
  opened with `<think>` (R1's chat template puts it in the prompt); with no `</think>` at all (cut
  short by max_tokens, say) the whole output is thinking.
- `qwen3`: thinking only when the output opens with `<think>` (leading whitespace aside), up to
  `</think>`; an output that does not (Qwen3 with `enable_thinking: false`) is all answer. For a
  model whose template opens the thought in the prompt, use `deepseek_r1`.

A constrained chat (structured output, or a tool_choice that is named or "required") is not
split: its grammar starts with the first token, so it never thinks aloud, and its answer is the
content (or the tool calls). The tags themselves are in neither field. Streamed, a choice's text
is split as it grows (`ReasoningStream`): what could still turn out to be a tag is held back
until it is known, so the pieces sent are exactly the split of the whole text.
"""

from __future__ import annotations

START, END = "<think>", "</think>"
PARSERS = ("deepseek_r1", "qwen3")


def split_reasoning(parser: str, text: str) -> tuple[str | None, str | None]:
    """(reasoning, content) of a whole output; None for a part that is not there."""
    reasoning, content = _split(parser, text)
    return reasoning, content or None


def _split(parser: str, text: str) -> tuple[str | None, str]:
    stripped = text.lstrip()
    opened = stripped.startswith(START)
    if parser == "qwen3" and not opened:
        return None, text
    body = stripped[len(START) :] if opened else text
    end = body.find(END)
    if end < 0:
        return body, ""
    return body[:end], body[end + len(END) :]


class ReasoningStream:
    """One streamed choice's text, split as it comes: `feed` returns the new (reasoning, content)."""

    def __init__(self, parser: str) -> None:
        self.parser = parser
        self.text = ""
        self.sent_reasoning = 0
        self.sent_content = 0

    def feed(self, delta: str, final: bool) -> tuple[str, str]:
        self.text += delta
        known = self.text if final else self._known()
        if known is None:
            return "", ""
        reasoning, content = _split(self.parser, known)
        reasoning = reasoning or ""
        new = reasoning[self.sent_reasoning :], content[self.sent_content :]
        self.sent_reasoning, self.sent_content = len(reasoning), len(content)
        return new

    def _known(self) -> str | None:
        """The text whose split cannot change as more comes: without a trailing piece that may
        be the start of `</think>`, and None while the opening could still be `<think>`."""
        stripped = self.text.lstrip()
        if len(stripped) < len(START) and START.startswith(stripped):
            return None
        if END in self.text:
            return self.text
        for k in range(min(len(END) - 1, len(self.text)), 0, -1):
            if END.startswith(self.text[-k:]):
                return self.text[:-k]
        return self.text
