"""The sampling fields of an OpenAI body (/v1/completions or /v1/chat/completions) as
`SamplingParams`: OpenAI's fields, vLLM's extras (top_k, min_p, repetition_penalty, ignore_eos,
stop_token_ids, min_tokens, allowed_token_ids, bad_words, beam search's use_beam_search,
length_penalty and early_stopping) and OpenAI's logit_bias. Types and the sizes that cost work are checked here;
ranges are left to `SamplingParams.validate`. A field the body leaves out takes the model's
default from its generation_config.json when the gateway has one (`generation_defaults`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from pagedserve.common.errors import InvalidArgument
from pagedserve.common.params import LOGIT_BIAS_RANGE, MAX_BAD_WORDS, MAX_LOGIT_BIAS, SamplingParams
from pagedserve.gateway import generation_defaults
from pagedserve.gateway.body_fields import (
    INT64_MAX,
    INT64_MIN,
    MISSING,
    check_text,
    get_field,
    read_bool,
    read_float,
    read_int,
    read_int_list,
    show,
)
from pagedserve.gateway.config import RequestLimits


def read_sampling(
    body: dict,
    max_tokens: int,
    logprobs: int | None,
    limits: RequestLimits,
    constraint: tuple[str, str] = ("", ""),
    defaults: Mapping[str, float] | None = None,
) -> SamplingParams:
    """The body's sampling fields; one it leaves out takes the model's default from
    `defaults` (its generation_config.json, see `generation_defaults`), else the API's own."""
    beam = read_bool(body, "use_beam_search", False)
    model = generation_defaults.for_request(defaults, beam)
    n_limit = (limits.max_beam_width, " with use_beam_search (the gateway's --max-beam-width)")
    n_hi, n_why = n_limit if beam else (limits.max_n, " (the gateway's --max-n)")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=read_float(body, "temperature", 0.0 if beam else model.get("temperature", 1.0)),
        top_p=read_float(body, "top_p", model.get("top_p", 1.0)),
        top_k=read_int(body, "top_k", model.get("top_k", 0)),
        min_p=read_float(body, "min_p", model.get("min_p", 0.0)),
        repetition_penalty=read_float(body, "repetition_penalty", model.get("repetition_penalty", 1.0)),
        presence_penalty=read_float(body, "presence_penalty", 0.0),
        frequency_penalty=read_float(body, "frequency_penalty", 0.0),
        seed=read_int(body, "seed", None, lo=INT64_MIN, hi=INT64_MAX),
        n=read_int(body, "n", 1, hi=n_hi, limit=n_why),
        stop_token_ids=read_int_list(body, "stop_token_ids"),
        ignore_eos=read_bool(body, "ignore_eos", False),
        logprobs=logprobs,
        min_tokens=read_int(body, "min_tokens", 0),
        structured_kind=constraint[0],
        structured_spec=constraint[1],
        use_beam_search=beam,
        length_penalty=read_float(body, "length_penalty", 1.0),
        early_stopping=_early_stopping(body),
        logit_bias=_logit_bias(body),
        allowed_token_ids=_allowed_token_ids(body),
        bad_words=_bad_words(body),
    )


def _allowed_token_ids(body: dict) -> list[int]:
    """An empty list would allow nothing (vLLM refuses it too); leaving the field out allows all."""
    ids = read_int_list(body, "allowed_token_ids")
    if not ids and get_field(body, "allowed_token_ids") is not MISSING:
        raise InvalidArgument(
            "allowed_token_ids must not be empty: leave it out to allow every token",
            field="allowed_token_ids",
        )
    return ids


def _bad_words(body: dict) -> list[str]:
    """vLLM's `bad_words`: a list of strings (the count checked before each one is read)."""
    value = get_field(body, "bad_words")
    if value is MISSING:
        return []
    if not isinstance(value, list):
        raise InvalidArgument("bad_words must be a list of strings", field="bad_words")
    if len(value) > MAX_BAD_WORDS:
        raise InvalidArgument(
            f"bad_words has {len(value)} words, more than the limit of {MAX_BAD_WORDS}", field="bad_words"
        )
    for i, word in enumerate(value):
        if not isinstance(word, str):
            raise InvalidArgument(f"bad_words[{i}] must be a string, got {show(word)}", field="bad_words")
        check_text(word, f"bad_words[{i}]", "bad_words")
    return value


def _early_stopping(body: dict) -> bool | str:
    value = get_field(body, "early_stopping")
    if value is MISSING:
        return False
    if value not in (True, False, "never") or isinstance(value, int | float) and not isinstance(value, bool):
        raise InvalidArgument(
            f'early_stopping must be true, false or "never", got {show(value)}', field="early_stopping"
        )
    return value


_TOKEN_ID_KEY = re.compile(r"-?[0-9]{1,11}")


def _logit_bias(body: dict) -> dict[int, float]:
    """OpenAI's `{"token id": bias}` (ids as JSON object keys, so strings); ranges are checked by
    `SamplingParams.validate`, the count here first, before anything is built for it."""
    value = get_field(body, "logit_bias")
    if value is MISSING:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument('logit_bias must be an object of {"token id": bias}', field="logit_bias")
    if len(value) > MAX_LOGIT_BIAS:
        raise InvalidArgument(
            f"logit_bias has {len(value)} tokens, more than the limit of {MAX_LOGIT_BIAS}", field="logit_bias"
        )
    bias = {}
    for key, number in value.items():
        if not _TOKEN_ID_KEY.fullmatch(key):
            raise InvalidArgument(f"logit_bias keys must be token ids, got {show(key)}", field="logit_bias")
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise InvalidArgument(
                f"logit_bias[{key}] must be a number, got {show(number)}", field="logit_bias"
            )
        if (
            not -LOGIT_BIAS_RANGE <= number <= LOGIT_BIAS_RANGE
        ):  # NaN fails too; a huge int is never made a float
            raise InvalidArgument(
                f"logit_bias[{key}] must be in [-100, 100], got {show(number)}", field="logit_bias"
            )
        bias[int(key)] = float(number)
    return bias
