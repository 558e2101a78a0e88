"""Structured output: what a request's constraint is, and the grammar it compiles to.

A constraint travels as two strings on `SamplingParams` (`structured_kind`, `structured_spec`),
so that it survives every form the parameters take (protobuf, the scheduler's JSON record in
Redis) unchanged. Kinds and their spec:

| kind          | spec                                   | OpenAI / vLLM field                         |
|---------------|----------------------------------------|---------------------------------------------|
| `json_schema` | the schema as JSON text                | response_format json_schema, structured_outputs.json |
| `json_object` | "" (any JSON object)                   | response_format json_object                 |
| `regex`       | a regular expression                   | structured_outputs.regex                    |
| `choice`      | a JSON list of strings                 | structured_outputs.choice                   |
| `grammar`     | EBNF (GBNF style, root rule `root`)    | structured_outputs.grammar                  |

`build_grammar` turns one into an xgrammar `Grammar`; it needs no tokenizer, so the gateway
runs it to refuse a bad schema, regex or grammar before anything is scheduled, and the
executor runs the same function before compiling against its vocabulary. xgrammar is
imported only here and in `pagedserve.executor.grammar`, and only when a constraint is used.
"""

from __future__ import annotations

import functools
import json
import re

from pagedserve.common.errors import InvalidArgument
from pagedserve.common.json_text import MAX_DEPTH, text_nests_over, too_deep

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
MAX_SPEC_CHARS = 1 << 16  # a schema or grammar larger than this is refused before compiling
MAX_SCHEMA_DEPTH = MAX_DEPTH  # arrays and objects inside one another in a JSON schema's text
MAX_PATTERN_REPEAT_WORK = 256**2  # sum of squared {m,n} bounds in a schema's patterns (one {0,256})
# JSON output without free whitespace: a small model cannot spend its tokens on blank runs,
# and ", " / ": " are the separators models see most in their training text.
_JSON_OPTIONS = {"any_whitespace": False}
# xgrammar's messages start with "[time] /path/to/file.cc:line: ".
_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


def check_shape(kind: str, spec: str, field: str = "structured") -> None:
    """Cheap checks every service can make without the grammar library."""
    if kind not in KINDS:
        raise InvalidArgument(f"{field}: unknown kind {kind!r}; one of {', '.join(KINDS)}", field=field)
    if kind != "json_object" and not spec:
        raise InvalidArgument(f"{field}.{kind} is empty", field=field)
    if len(spec) > MAX_SPEC_CHARS:
        raise InvalidArgument(
            f"{field}.{kind} is {len(spec)} characters, more than the limit of {MAX_SPEC_CHARS}", field=field
        )
    if kind == "json_schema" and _schema_too_deep(spec):
        raise too_deep(f"{field}.json_schema", MAX_SCHEMA_DEPTH, field)
    if kind == "json_schema" and (work := _pattern_repeat_work(spec)) > MAX_PATTERN_REPEAT_WORK:
        raise InvalidArgument(
            f"{field}.json_schema: the repetition counts in its patterns are too large (the squares of "
            f"their {{m,n}} bounds add up to {work}, more than the limit of {MAX_PATTERN_REPEAT_WORK}, "
            "which is one {0,256}): building such a pattern takes time that grows with the square of "
            "each bound; use minLength/maxLength for long strings",
            field=field,
        )


@functools.lru_cache(maxsize=256)
def _schema_too_deep(spec: str) -> bool:
    """A schema's grammar takes time that grows with the cube of its nesting (a 30 KB schema
    nested 800 levels deep: a minute), so its nesting is limited. Remembered per text: every
    service checks a request's schema, the gateway several times."""
    return text_nests_over(spec, MAX_SCHEMA_DEPTH)


# The grammar library reads `{ 5 , 9 }` as `{5,9}`, so spaces around the numbers are allowed here too.
_QUANTIFIER = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


@functools.lru_cache(maxsize=256)
def _pattern_repeat_work(spec: str) -> int:
    """The sum of the squared repetition bounds (`{m,n}`: n, `{m}` and `{m,}`: m) in every
    `pattern` and `patternProperties` regex of a schema. The grammar library expands a schema
    pattern's counted repetition, in time that grows with the square of its bound (`.{0,1000}`:
    half a second, `(a|b){1,10000}`: a minute, in the gateway and again in the executor), while
    nesting adds little. 0 for text that is not JSON (the grammar library reports that)."""
    try:
        schema = json.loads(spec)
    except (ValueError, RecursionError):
        return 0
    work, todo = 0, [schema]
    while todo:
        node = todo.pop()
        if isinstance(node, list):
            todo.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        patterns = [node.get("pattern")]
        if isinstance(node.get("patternProperties"), dict):
            patterns.extend(node["patternProperties"])
        for pattern in patterns:
            if isinstance(pattern, str):
                for m, n in _QUANTIFIER.findall(pattern):
                    bound = int(n) if n else int(m)
                    work += min(bound, 1 << 20) ** 2
        todo.extend(node.values())
    return work


def choice_spec(choices: list[str], field: str) -> str:
    """The spec of a choice constraint, after checking it is a non-empty list of non-empty strings."""
    if not isinstance(choices, list) or not choices:
        raise InvalidArgument(f"{field} must be a non-empty list of strings", field=field)
    if not all(isinstance(c, str) and c for c in choices):
        raise InvalidArgument(f"{field} must hold non-empty strings only", field=field)
    return json.dumps(choices, ensure_ascii=False)


def _ebnf_literal(text: str) -> str:
    # A JSON string literal is also an EBNF one: the same quote and backslash escapes.
    return json.dumps(text, ensure_ascii=False)


def build_grammar(kind: str, spec: str, field: str = "structured"):
    """An xgrammar `Grammar` for the constraint; `InvalidArgument` naming `field` when it is bad."""
    check_shape(kind, spec, field)
    import xgrammar as xgr

    try:
        if kind == "json_schema":
            return xgr.Grammar.from_json_schema(spec, **_JSON_OPTIONS)
        if kind == "json_object":
            return xgr.Grammar.from_json_schema('{"type": "object"}', **_JSON_OPTIONS)
        if kind == "regex":
            return xgr.Grammar.from_regex(spec)
        if kind == "choice":
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(_ebnf_literal(c) for c in json.loads(spec)))
        return xgr.Grammar.from_ebnf(spec)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise _library_error(kind, exc, field) from None


def _library_error(kind: str, exc: Exception, field: str) -> InvalidArgument:
    message = _LOCATION.sub("", str(exc).strip()).strip()
    what = {"json_schema": "JSON schema", "regex": "regex", "grammar": "grammar"}.get(kind, kind)
    return InvalidArgument(f"{field}: invalid {what}: {message}", field=field)


@functools.cache
def _probe_compiler():
    """A compiler for a three-token vocabulary: compiling against it finds what only compiling
    does (a JSON schema's minLength of -5, say) in a millisecond or two, where the executor would
    find it against the real vocabulary and end the request with an empty answer."""
    import xgrammar as xgr

    return xgr.GrammarCompiler(xgr.TokenizerInfo(["a", "b", "</s>"], stop_token_ids=[2]), cache_enabled=False)


@functools.lru_cache(maxsize=256)
def _check_cached(kind: str, spec: str) -> str | None:
    try:
        grammar = build_grammar(kind, spec, field="")
    except InvalidArgument as exc:
        return exc.message.removeprefix(": ")
    try:
        _probe_compiler().compile_grammar(grammar)
    except (RuntimeError, ValueError, TypeError) as exc:
        return _library_error(kind, exc, "").message.removeprefix(": ")
    return None


def validate(kind: str, spec: str, field: str) -> None:
    """`build_grammar`'s verdict, remembered per distinct (kind, spec): a client that sends the same
    schema with every request pays for parsing it once."""
    check_shape(kind, spec, field)
    error = _check_cached(kind, spec)
    if error is not None:
        raise InvalidArgument(f"{field}: {error}", field=field)


def warm_up() -> None:
    """Import the grammar library and parse one tiny grammar, so that the first request with a
    constraint does not pay for it (the import alone takes ~1 s, more on a busy machine). Run it
    off the event loop, at start."""
    build_grammar("regex", "a")


def to_proto(kind: str, spec: str):
    """A `pagedserve.v1.StructuredOutput`."""
    from pagedserve.v1 import common_pb2

    msg = common_pb2.StructuredOutput()
    if kind == "json_object":
        msg.json_object = True
    elif kind == "choice":
        msg.choice.choices.extend(json.loads(spec))
    else:
        setattr(msg, kind, spec)
    return msg


def from_proto(msg, field: str = "structured") -> tuple[str, str]:
    """(kind, spec) of a `StructuredOutput`; ("", "") when none is set."""
    kind = msg.WhichOneof("kind")
    if kind is None:
        return "", ""
    if kind == "json_object":
        if not msg.json_object:
            raise InvalidArgument(f"{field}.json_object must be true when set", field=field)
        return kind, ""
    if kind == "choice":
        return kind, choice_spec(list(msg.choice.choices), f"{field}.choice")
    return kind, getattr(msg, kind)
