"""Structured-output fields of the OpenAI-style bodies, to a (kind, spec) constraint.

- OpenAI's `response_format`: `{"type": "text"}` (none), `{"type": "json_object"}`, or
  `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}`;
- vLLM's `structured_outputs`: exactly one of `json` (a schema, as an object or JSON text),
  `regex`, `choice` (a list of strings), `grammar` (EBNF) or `json_object: true`; and vLLM's
  older top-level `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`, read the same.

Each constraint is parsed by the grammar library here, in the gateway (once per distinct spec),
so that a bad schema, regex or grammar is a 400 naming its field before anything is scheduled.
`strict` is accepted either way: the output always follows the schema exactly.
"""

from __future__ import annotations

import json

from pagedserve.common import structured
from pagedserve.common.errors import InvalidArgument
from pagedserve.common.json_text import load_json_text
from pagedserve.common.structured import MAX_SCHEMA_DEPTH

NONE = ("", "")
_STRUCTURED_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}


def _schema_text(schema, field: str) -> str:
    """A schema given as an object, a boolean or JSON text, as compact JSON text."""
    if isinstance(schema, str):
        schema = load_json_text(schema, field, MAX_SCHEMA_DEPTH)
    if not isinstance(schema, dict | bool):
        raise InvalidArgument(f"{field} must be a JSON Schema object", field=field)
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def response_format(value) -> tuple[str, str]:
    """OpenAI's `response_format`."""
    field = "response_format"
    if not isinstance(value, dict):
        raise InvalidArgument(f"{field} must be an object with a type", field=field)
    kind = value.get("type")
    if kind == "text":
        return NONE
    if kind == "json_object":
        return "json_object", ""
    if kind != "json_schema":
        raise InvalidArgument(
            f"{field}.type must be text, json_object or json_schema, got {kind!r}", field=field
        )
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or "schema" not in spec:
        raise InvalidArgument(
            f"{field}.json_schema must be an object with name and schema", field=f"{field}.json_schema"
        )
    name = spec.get("name", "")
    if not isinstance(name, str):
        raise InvalidArgument(f"{field}.json_schema.name must be a string", field=f"{field}.json_schema.name")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidArgument(
            f"{field}.json_schema.strict must be true or false", field=f"{field}.json_schema.strict"
        )
    where = f"{field}.json_schema.schema"
    return "json_schema", _schema_text(spec["schema"], where)


def structured_outputs(value, guided: bool = False) -> tuple[str, str]:
    """vLLM's `structured_outputs` (or, `guided`, its `guided_*` fields gathered in one dict)."""
    field = "structured_outputs"
    if not isinstance(value, dict):
        raise InvalidArgument(f"{field} must be an object", field=field)
    given = [k for k in (*_STRUCTURED_KEYS, "json_object") if value.get(k) not in (None, False)]
    if len(given) != 1:
        raise InvalidArgument(
            f"{field} must set exactly one of json, regex, choice, grammar, json_object; got "
            f"{', '.join(given) or 'none'}",
            field=field,
        )
    (key,) = given
    where = _field(key, guided)
    item = value[key]
    if key == "json_object":
        if item is not True:
            raise InvalidArgument(f"{where} must be true", field=where)
        return "json_object", ""
    if key == "json":
        return "json_schema", _schema_text(item, where)
    if key == "choice":
        return "choice", structured.choice_spec(item, where)
    if not isinstance(item, str):
        raise InvalidArgument(f"{where} must be a string", field=where)
    return _STRUCTURED_KEYS[key], item


def _field(key: str, guided: bool) -> str:
    return f"guided_{key}" if guided else f"structured_outputs.{key}"


def parse_constraint(body: dict) -> tuple[str, str, str]:
    """(kind, spec, field) of a body's constraint, validated; ("", "", "") when it has none."""
    fmt, outputs = body.get("response_format"), body.get("structured_outputs")
    guided = {key: body[f"guided_{key}"] for key in _STRUCTURED_KEYS if body.get(f"guided_{key}") is not None}
    if guided:
        if outputs is not None:
            raise InvalidArgument(
                "structured_outputs and guided_* cannot both be given", field="structured_outputs"
            )
        outputs = guided
    if fmt is not None and outputs is not None:
        raise InvalidArgument(
            "response_format and structured_outputs cannot both be given", field="structured_outputs"
        )
    if fmt is not None:
        (kind, spec), field = response_format(fmt), "response_format"
        if kind == "json_schema":
            field = "response_format.json_schema.schema"
    elif outputs is not None:
        (kind, spec), field = structured_outputs(outputs, bool(guided)), "structured_outputs"
        if kind:
            field = _field(next(k for k in outputs if outputs[k] not in (None, False)), bool(guided))
    else:
        return "", "", ""
    if kind:
        structured.validate(kind, spec, field)
    return kind, spec, field
