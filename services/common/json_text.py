"""JSON that arrives as text from a client, read so that a hostile one costs little and fails with a
clear error naming its field: an HTTP body, or the JSON text fields of the gRPC API (`tools_json`,
`chat_template_kwargs_json`, a tool call's arguments, a JSON schema).

Nesting is what makes JSON expensive: Python's parser stops at its recursion limit with a
RecursionError, not a ValueError, and what walks the parsed value afterwards (a chat template's
renderer, a JSON schema's grammar, whose build time grows with the cube of the nesting) pays for
every level. So nesting is limited, and checked without recursion.
"""

from __future__ import annotations

import json

from pagedserve.common.errors import InvalidArgument

MAX_DEPTH = 64  # arrays and objects inside one another, in a JSON text field


def depth_over(value: object, limit: int) -> bool:
    """Whether arrays and objects in parsed JSON nest deeper than `limit` (iterative: no
    recursion). A list of scalars (a prompt's token ids) is passed over at C speed."""
    if type(value) not in (dict, list):
        return False
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if type(item) is dict else item
        types = set(map(type, children))
        if list in types or dict in types:
            stack.extend((c, depth + 1) for c in children if type(c) in (dict, list))
    return False


def too_deep(name: str, max_depth: int, field: str | None = None) -> InvalidArgument:
    """The error for `name` nesting more than `max_depth` levels (`field`: the one to report, if
    not `name` itself)."""
    return InvalidArgument(
        f"{name} nests arrays or objects more than {max_depth} levels deep", field=field or name
    )


def text_nests_over(text: str, limit: int) -> bool:
    """Whether JSON `text` nests arrays and objects more than `limit` levels (False for text that
    is not JSON: its own parser then says what is wrong with it)."""
    if text.count("[") + text.count("{") <= limit:  # cannot nest deeper than it opens: no parse
        return False
    try:
        return depth_over(json.loads(text), limit)
    except RecursionError:
        return True
    except ValueError:
        return False


def load_json_text(text: str, field: str, max_depth: int = MAX_DEPTH) -> object:
    """`text` parsed; InvalidArgument naming `field` when it is not JSON or nests more than
    `max_depth` levels."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise too_deep(field, max_depth) from None
    except ValueError as err:
        raise InvalidArgument(f"{field} is not valid JSON: {err}", field=field) from None
    if depth_over(value, max_depth):
        raise too_deep(field, max_depth)
    return value
