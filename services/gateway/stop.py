"""Stop strings matched across token boundaries.

Text arrives in pieces (one detokenized step at a time), so a stop string can start in one
piece and end in another. `StopMatcher` holds back the shortest tail that could still grow
into a stop string and releases it once it cannot; the text it returns never contains a
stop string and always ends before the first one matched (or, with `include`, right after it).

Invariant: the released text never ends with a proper prefix of any stop string while more
text may come, so a match always starts inside `held + piece` and only that is searched.
"""

from __future__ import annotations

from typing import NamedTuple


class StopResult(NamedTuple):
    text: str  # safe to show now
    stopped: bool  # a stop string matched; `text` ends right before it (or after, with include)


class StopMatcher:
    """Per-choice stop-string state. With no stop strings, text passes straight through."""

    __slots__ = ("stops", "held", "stopped", "include")

    def __init__(self, stops: list[str], include: bool = False) -> None:
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        self.stops = list(dict.fromkeys(stops))
        self.held = ""
        self.stopped = False
        self.include = include  # the matched stop string ends the text (vLLM's include_stop_str_in_output)

    def feed(self, piece: str) -> StopResult:
        """Add newly detokenized text; return what can be shown now."""
        if self.stopped:
            return StopResult("", True)
        if not self.stops:
            return StopResult(piece, False)
        text = self.held + piece
        found = [(i, stop) for stop in self.stops if (i := text.find(stop)) >= 0]
        if found:
            first, stop = min(found, key=lambda f: f[0])  # the earliest; on a tie, the first listed
            self.held = ""
            self.stopped = True
            return StopResult(text[: first + len(stop) if self.include else first], True)
        keep = self._partial_tail(text)
        self.held = text[len(text) - keep :] if keep else ""
        return StopResult(text[: len(text) - keep], False)

    def flush(self) -> str:
        """The sequence ended without a match: release whatever was held back."""
        text, self.held = self.held, ""
        return "" if self.stopped else text

    def _partial_tail(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:length]):
                    best = length
                    break
        return best
