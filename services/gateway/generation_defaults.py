"""Default sampling parameters from the model's `generation_config.json`, as vLLM applies them.

A model's authors often ship the sampling they tuned it for (Llama 3 Instruct: temperature 0.6,
top_p 0.9; Qwen: top_k 20, repetition_penalty 1.05). With `--generation-config auto` (the
default) the gateway reads those fields from the model folder's file at start, and a request that
does not set one gets the model's value instead of the API's own default (temperature 1.0, top_p
1.0, top_k off, min_p 0, repetition_penalty 1.0). A request's own value always wins; beam search
takes none of them (it is greedy and refuses the others). `vllm` ignores the file, and a folder
path reads that folder's file instead (for a hub id, `auto` reads the copy in the local Hugging
Face cache, if there is one). Other fields of the file (`do_sample`, `max_new_tokens`,
...) are not used: an explicit request is never capped by them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from pagedserve.common.errors import InvalidArgument
from pagedserve.common.params import SamplingParams
from pagedserve.gateway.body_fields import read_float, read_int

FILE_NAME = "generation_config.json"
# read as a request's fields are (top_k an integer, the rest floats); ranges: SamplingParams.validate
FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def _find(source: str, model: str) -> Path | None:
    """The file `source` names for `model`: a folder's, or for `auto` the model folder's, or the
    copy of a hub model's in the local Hugging Face cache (never downloaded)."""
    if source != "auto":
        path = Path(source) / FILE_NAME
        if not path.is_file():
            raise ValueError(f"--generation-config {source}: no {FILE_NAME} in that folder")
        return path
    if Path(model).is_dir():
        path = Path(model) / FILE_NAME
        return path if path.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, FILE_NAME)
    except Exception:  # not a repo id, no cache: nothing to read
        return None
    return Path(cached) if isinstance(cached, str) else None


def load(source: str, model: str) -> dict[str, float]:
    """The defaults `--generation-config source` gives for `model`: `auto` reads the model's file
    (none when it has none), `vllm` none, anything else is a folder whose file must exist. A bad
    value is a ValueError naming the file and the field."""
    path = None if source == "vllm" else _find(source, model)
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise ValueError(f"{path} could not be read as JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    if isinstance(data.get("top_k"), float) and data["top_k"].is_integer():
        data["top_k"] = int(data["top_k"])  # 20.0, as some files write it
    defaults: dict[str, float] = {}
    try:
        for name in FIELDS:
            value = read_int(data, name, None) if name == "top_k" else read_float(data, name, None)
            if value is not None:
                defaults[name] = value
        if defaults.get("top_k") == -1:
            defaults["top_k"] = 0  # off, in this API's spelling
        SamplingParams(**defaults).validate()
    except InvalidArgument as err:
        raise ValueError(f"{path}: {err.message}") from None
    return defaults


def describe(defaults: Mapping[str, float]) -> str:
    return ", ".join(f"{name}={value:g}" for name, value in defaults.items())


def for_request(defaults: Mapping[str, float] | None, beam: bool) -> Mapping[str, float]:
    """The model's defaults a request takes for the fields it leaves out: none with beam search,
    which is greedy and refuses the sampling fields."""
    return {} if beam or defaults is None else defaults
