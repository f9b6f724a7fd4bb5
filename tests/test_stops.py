"""Stop strings (core/stops.py): literal cases, brute-force references, and the streaming contract: what is
streamed chunk by chunk never contains a stop string and adds up to the text before the first one to appear."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from homespec.core.stops import find_stop, held_back


def test_literal_cases() -> None:
    assert find_stop("hello world", ["wor"]) == 6
    assert find_stop("hello world", ["xyz"]) is None
    assert find_stop("a.b\n\nc", ["\n\n", "."]) == 1
    assert held_back("hello wo", ["world"]) == 2
    assert held_back("hello", ["world"]) == 0
    assert held_back("abab", ["abac"]) == 2  # "ab" could still become "abac"
    assert held_back("x", ["x"]) == 0  # a whole stop string is found, not held back


texts = st.text(alphabet="ab.\n", max_size=40)
stop_lists = st.lists(st.text(alphabet="ab.\n", min_size=1, max_size=4), min_size=1, max_size=4)


def brute_find(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s in text]
    return min(hits) if hits else None


@given(texts, stop_lists)
def test_find_matches_brute_force(text: str, stops: list[str]) -> None:
    assert find_stop(text, stops) == brute_find(text, stops)


@given(texts, stop_lists)
def test_held_back_matches_brute_force(text: str, stops: list[str]) -> None:
    expected = max((n for s in stops for n in range(1, len(s)) if n <= len(text) and text.endswith(s[:n])), default=0)
    assert held_back(text, stops) == expected


@given(texts, stop_lists, st.lists(st.integers(1, 5), min_size=1, max_size=40))
def test_streaming_never_leaks_a_stop(text: str, stops: list[str], cuts: list[int]) -> None:
    """The engine's loop (RequestRun.on_step): search only the new part, stream all but what is held back."""
    sent, searched, shown, at, pos = "", 0, 0, None, 0
    for n in [*cuts, len(text)]:
        pos = min(len(text), pos + n)
        visible = text[:pos]
        at = find_stop(visible, stops, searched)
        if at is not None:
            sent += visible[shown:at]
            break
        show = len(visible) - held_back(visible, stops)
        sent += visible[shown:show]
        shown, searched = show, len(visible)
        if pos == len(text):
            sent += text[shown:]  # the end: what was held back goes out
            break
    # generation ends at the first commit whose text holds a stop, cut where the earliest one there begins
    want, pos = text, 0
    for n in [*cuts, len(text)]:
        pos = min(len(text), pos + n)
        first = brute_find(text[:pos], stops)
        if first is not None:
            want = text[:first]
            break
    assert sent == want
    assert brute_find(sent, stops) is None
