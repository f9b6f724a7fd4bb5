"""SpecPipe-DB's per-step budget split (core/step.split_budget): literal cases and properties."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from homespec.core.step import split_budget


def test_literal_cases() -> None:
    assert split_budget(32, 1) == [32]
    assert split_budget(32, 4) == [8, 8, 8, 8]
    assert split_budget(10, 4, tick=0) == [3, 3, 2, 2]
    assert split_budget(10, 4, tick=1) == [2, 3, 3, 2]
    assert split_budget(2, 3) == [1, 1, 1]  # more requests than nodes: each still advances
    assert split_budget(8, 0) == []


@given(st.integers(1, 256), st.integers(1, 64), st.integers(0, 10_000))
def test_shares_are_fair(total: int, requests: int, tick: int) -> None:
    shares = split_budget(total, requests, tick)
    assert len(shares) == requests and min(shares) >= 1
    assert max(shares) - min(shares) <= 1
    assert sum(shares) == max(total, requests)


@given(st.integers(1, 256), st.integers(1, 16), st.integers(0, 1000))
def test_the_remainder_rotates(total: int, requests: int, tick: int) -> None:
    """Over ``requests`` consecutive ticks every request gets the same number of nodes."""
    sums = [sum(split_budget(total, requests, t)[i] for t in range(tick, tick + requests)) for i in range(requests)]
    assert len(set(sums)) == 1
