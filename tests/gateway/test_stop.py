"""Stop strings across token boundaries: what is shown, what is held back, where it ends."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagedserve.gateway.stop import StopMatcher


def run(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    matcher = StopMatcher(stops)
    shown = []
    for piece in pieces:
        result = matcher.feed(piece)
        shown.append(result.text)
        if result.stopped:
            return shown, True
    shown.append(matcher.flush())
    return shown, False


def test_no_stop_strings_pass_text_through() -> None:
    assert run([], ["ab", "", "c"]) == (["ab", "", "c", ""], False)


def test_match_inside_one_piece_ends_before_it() -> None:
    assert run(["\n\n"], ["def f():\n\nx"]) == (["def f():"], True)


def test_match_split_over_three_pieces_holds_back_then_cuts() -> None:
    shown, stopped = run(["STOP"], ["abc S", "T", "OP more"])
    assert stopped
    assert shown == ["abc ", "", ""]
    assert "".join(shown) == "abc "


def test_held_text_is_released_when_it_cannot_become_a_stop() -> None:
    matcher = StopMatcher(["<end>"])
    assert matcher.feed("x <e").text == "x "
    assert matcher.held == "<e"
    assert matcher.feed("nx").text == "<enx"
    assert matcher.held == ""


def test_held_text_is_flushed_at_the_end() -> None:
    assert run(["###"], ["a #", "#"]) == (["a ", "", "##"], False)


def test_earliest_of_several_stops_wins() -> None:
    # "l" may begin "lo w", so it is held back; then "lo w" matches before "world" does.
    assert run(["world", "lo w"], ["hel", "lo world"]) == (["he", "l"], True)


def test_after_a_match_nothing_more_is_shown() -> None:
    matcher = StopMatcher(["."])
    assert matcher.feed("a.b") == ("a", True)
    assert matcher.feed("c") == ("", True)
    assert matcher.flush() == ""


def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(ValueError):
        StopMatcher(["ok", ""])


@given(
    text=st.text(alphabet="ab\n ", max_size=40),
    stop=st.text(alphabet="ab\n ", min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=8),
)
def test_any_split_gives_the_text_before_the_first_match(text: str, stop: str, cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    shown, stopped = run([stop], pieces)
    first = text.find(stop)
    assert stopped == (first >= 0)
    assert "".join(shown) == (text[:first] if first >= 0 else text)


def test_include_ends_the_text_with_the_matched_stop_string() -> None:
    def run_including(stops: list[str], pieces: list[str]) -> str:
        matcher = StopMatcher(stops, include=True)
        shown = []
        for piece in pieces:
            result = matcher.feed(piece)
            shown.append(result.text)
            if result.stopped:
                return "".join(shown)
        raise AssertionError("no stop string matched")

    assert run_including(["STOP"], ["abc S", "T", "OP more"]) == "abc STOP"
    assert run_including(["\n\n"], ["def f():\n\nx"]) == "def f():\n\n"
    # the earliest match wins; at one position, the first listed
    assert run_including(["cd", "b"], ["abcd"]) == "ab"
    assert run_including(["ab", "abc"], ["xabc"]) == "xab"
    assert run_including(["abc", "ab"], ["xabc"]) == "xabc"
