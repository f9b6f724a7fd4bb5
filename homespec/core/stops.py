"""Stop strings (OpenAI ``stop``): where the output must end, and how much of a streamed text to hold back so
that no part of a stop string is ever sent. Pure: stdlib only.

A stop string may span several tokens, so the decision is made on text: ``find_stop`` says where the earliest stop
string begins; ``held_back`` says how many trailing characters could still become the start of one and must wait
for the next tokens before they are streamed.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_STOPS = 4  # as OpenAI's API
MAX_STOP_CHARS = 256


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Index of the earliest stop string in ``text`` that ends after ``start`` (text before ``start`` was already
    searched), or None."""
    best: int | None = None
    for s in stops:
        i = text.find(s, max(0, start - len(s) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string (0 when none)."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
