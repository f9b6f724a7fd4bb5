"""Stop strings (core/stops.py): literal cases, brute-force references, and the streaming contract: what is
streamed chunk by chunk never contains a stop string and adds up to the text before the first one to appear."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
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


@pytest.fixture(scope="module")
def engine(engines: Any) -> Any:
    return engines("none")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts, stop_lists, st.lists(st.integers(1, 4), min_size=1, max_size=40))
def test_streaming_never_leaks_a_stop(engine: Any, text: str, stops: list[str], cuts: list[int]) -> None:
    """The engine's own per-request loop (``RequestRun.on_step``, then ``finish``) on the real tokenizer: the text's
    tokens are verified a few at a time; what is streamed never holds a stop string and adds up to the text before
    the first stop to appear in a commit, cut where it begins; the final text is the same, and the tokens kept are
    those up to the one that completed the stop."""
    from homespec.config import GenerationConfig
    from homespec.core.step import DecodeStep
    from homespec.core.tree import Verification
    from homespec.engine import RequestRun
    from homespec.events import GenerationFinished, TokensCommitted

    ids = list(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
    assume(ids)

    def decoded(n: int) -> str:
        return str(engine.tokenizer.decode(ids[:n], skip_special_tokens=True))

    config = GenerationConfig(max_tokens=len(ids), stop=tuple(stops), stop_on_eos=False)
    run = RequestRun(engine.run_context("ar"), [1, 2, 3], config, "ar", engine.build_draft("none"))
    streamed, at, ends = "", 0, []
    for tick, n in enumerate([*cuts, len(ids)], 1):
        chunk = ids[at : at + n]
        at += len(chunk)
        ends.append(at)
        step = DecodeStep(Verification(tuple(chunk), (), (), 0, False, 0), wave_size=len(chunk), tick=tick)
        streamed += "".join(e.text for e in run.on_step(step) if isinstance(e, TokensCommitted))
        assert brute_find(streamed, stops) is None, f"a stop string was streamed: {streamed!r}"
        if run.done:
            break
    events = list(run.finish())
    streamed += "".join(e.text for e in events if isinstance(e, TokensCommitted))
    done = events[-1]
    assert isinstance(done, GenerationFinished)
    # generation ends at the first commit whose text holds a stop, cut where the earliest one there begins
    want, reason, kept = decoded(len(ids)), "length", len(ids)
    for end in ends:
        first = brute_find(decoded(end), stops)
        if first is not None:
            want, reason = decoded(end)[:first], "stop"
            kept = next(k for k in range(1, end + 1) if brute_find(decoded(k), stops) == first)
            break
    assert streamed == done.text == want
    assert done.reason == reason
    assert list(done.tokens) == ids[:kept]
