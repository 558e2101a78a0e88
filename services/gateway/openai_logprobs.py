"""Log-probabilities in the OpenAI JSON forms: chat's `logprobs.content`, the legacy completions
form (tokens, token_logprobs, top_logprobs, text_offset) and vLLM's `prompt_logprobs`."""

from __future__ import annotations

from pagedserve.gateway.datatypes import PromptLogprobs, TokenLogprob, TopLogprob

# What JSON shows for a logprob of -inf (a token a mask ruled out, e.g. an alternative past a short
# allowed_token_ids) or NaN: JSON has no infinity, and a client's parser would refuse the body.
LOGPROB_FLOOR = -9999.0


def json_logprob(value: float) -> float:
    """`value`, or LOGPROB_FLOOR when it is below it, -inf or NaN."""
    return value if value >= LOGPROB_FLOOR else LOGPROB_FLOOR


def _shown(token_id: int, token: str | None, as_ids: bool) -> str:
    """How logprobs name a token: its text, or "token_id:<id>" (return_tokens_as_token_ids)."""
    return f"token_id:{token_id}" if as_ids else token or ""


def _chat_entry(t: TokenLogprob | TopLogprob, as_ids: bool) -> dict:
    token = _shown(t.token_id, t.token, as_ids)
    return {"token": token, "logprob": json_logprob(t.logprob), "bytes": list(token.encode())}


def chat_logprobs_json(logprobs: list[TokenLogprob], as_ids: bool = False) -> dict:
    return {
        "content": [
            {**_chat_entry(lp, as_ids), "top_logprobs": [_chat_entry(t, as_ids) for t in lp.top]}
            for lp in logprobs
        ]
    }


def completion_logprobs_json(
    logprobs: list[TokenLogprob],
    text_offset: int,
    prompt: PromptLogprobs | None = None,
    k: int = 0,
    as_ids: bool = False,
) -> dict:
    """The legacy completions form; `text_offset` is where the first token's text starts. With
    `prompt` (echo), the prompt's tokens come first, the first with null logprob and tops, the
    others with their top `k`. `as_ids`: tokens are named "token_id:<id>"."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict | None] = []

    def add(lp: TokenLogprob, tops: list[TopLogprob]) -> None:
        tokens.append(_shown(lp.token_id, lp.token, as_ids))
        token_logprobs.append(json_logprob(lp.logprob))
        top_logprobs.append({_shown(t.token_id, t.token, as_ids): json_logprob(t.logprob) for t in tops})

    if prompt is not None:
        tokens.append(_shown(prompt.first_token_id, prompt.first_token, as_ids))
        token_logprobs.append(None)
        top_logprobs.append(None)
        for lp in prompt.logprobs:
            add(lp, lp.top[:k])
    for lp in logprobs:
        add(lp, lp.top)
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }


def prompt_logprobs_json(prompt: PromptLogprobs | None, k: int) -> list[dict | None] | None:
    """vLLM's `prompt_logprobs`: null for the first token, then per token a map from token id
    (a string, as JSON keys are) to {logprob, rank, decoded_token} for the prompt's own token and
    its top `k`. Ranks are 1-based, over the whole vocabulary."""
    if prompt is None:
        return None
    entries: list[dict | None] = [None]
    for lp in prompt.logprobs:
        tops = lp.top[:k]
        entry = {
            str(lp.token_id): {
                "logprob": json_logprob(lp.logprob),
                "rank": lp.rank,
                "decoded_token": lp.token,
            }
        }
        for i, t in enumerate(tops):
            entry.setdefault(
                str(t.token_id), {"logprob": json_logprob(t.logprob), "rank": i + 1, "decoded_token": t.token}
            )
        entries.append(entry)
    return entries
