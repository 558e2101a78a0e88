"""Default sampling parameters from the model's `generation_config.json`, as vLLM applies them.

A model's authors often ship the sampling they tuned it for (Llama 3 Instruct: temperature 0.6,
top_p 0.9; Qwen: top_k 20, repetition_penalty 1.05). With `--generation-config auto` (the
default) the gateway reads those fields from the model folder's file at start, and a request that
does not set one gets the model's value instead of the API's own default (temperature 1.0, top_p
1.0, top_k off, min_p 0, repetition_penalty 1.0). A request's own value always wins; beam search
takes none of them (it is greedy and refuses the others). `vllm` ignores the file, and a folder
path reads that folder's file instead. Other fields of the file (`do_sample`, `max_new_tokens`,
...) are not used: an explicit request is never capped by them.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

FILE_NAME = "generation_config.json"
# field -> (is an integer, the check, what the check says)
FIELDS = {
    "temperature": (False, lambda v: v >= 0, ">= 0"),
    "top_p": (False, lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (True, lambda v: v >= -1, ">= -1 (0 or -1: off)"),
    "min_p": (False, lambda v: 0 <= v <= 1, "in [0, 1]"),
    "repetition_penalty": (False, lambda v: v > 0, "> 0"),
}
CHOICES = ("auto", "vllm")


def load(source: str, model: str) -> dict[str, float]:
    """The defaults `--generation-config source` gives for `model`: `auto` reads the model
    folder's file (none when the model is not a local folder or has no file), `vllm` none,
    anything else is a folder whose file must exist. A bad value is a ValueError naming it."""
    if source == "vllm":
        return {}
    folder = Path(model if source == "auto" else source)
    path = folder / FILE_NAME
    if not path.is_file():
        if source == "auto":
            return {}
        raise ValueError(f"--generation-config {source}: no {FILE_NAME} in that folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} could not be read as JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    defaults: dict[str, float] = {}
    for name, (integer, ok, rule) in FIELDS.items():
        value = data.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{path}: {name} must be a number, got {value!r}")
        if integer and value != int(value) or not ok(value):
            raise ValueError(
                f"{path}: {name} must be {'an integer ' if integer else ''}{rule}, got {value!r}"
            )
        defaults[name] = int(value) if integer else float(value)
    if defaults.get("top_k") == -1:
        defaults["top_k"] = 0  # off, in this API's spelling
    return defaults


def describe(defaults: Mapping[str, float]) -> str:
    return ", ".join(f"{name}={value:g}" for name, value in defaults.items())


def apply(values: dict, defaults: Mapping[str, float], beam: bool) -> dict:
    """`values` (the fields a request gave) with the model's defaults filled in for the rest."""
    if beam:
        return values
    return {**defaults, **values}
