"""The ``auto`` draft source (SPIN): several arms over shared draft sources, chosen by ``core.bandit``.

An arm is a mix of base sources (``ngram+recycle``, ``ngram+head+recycle``, or ``ngram+eagle+recycle`` where the
head shipped for the target is an EAGLE-3 one); the bases are built once and shared,
so every base sees every request, verification, top-k and feature whichever arm is playing (the recycling table
keeps learning, the head keeps its features and catches up when it is chosen again). The bandit chooses at the
start of each request and again once a window has ``period`` verifications and ``min_tokens`` tokens; the
window's reward is the tokens it emitted per unit of work, ``tokens / (verifications + w * draft cost)``, with
``w = 1`` in ``ar`` (the draft runs on the target's device, in series) and ``w = 0`` in the pipelined modes (it
runs beside the pipeline, on the head). The bandit's state lives as long as this object: an engine keeps it
across requests.

When draft compute is free (``w = 0``), an arm whose bases are all in a larger arm has nothing to win: the larger
arm's tree holds its nodes too, and a score-ordered wave takes the best of them. Measured (BENCHMARKS.md §2), a
bandit among such nested arms lost tokens to chance, since a window's reward depends more on its prompt than on
its arm: the pipelined modes therefore choose among the maximal arms only (with the default arms, always the
union). In ``ar``, where a head forward costs target time, every arm plays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from homespec.core.bandit import DraftBandit, cost_weight, window_reward
from homespec.core.tree import TokenTree, Verification
from homespec.model.drafts.base import DraftSource
from homespec.model.drafts.mix import MixDraft

DEFAULT_PERIOD = 8  # verifications per bandit window, at least
MIN_WINDOW_TOKENS = 16  # and tokens: a pipelined step emits ~0.25 token, and 8 of them would be noise


class AutoDraft(DraftSource):
    name = "auto"

    def __init__(
        self,
        bases: Mapping[str, DraftSource],
        arms: Sequence[str],
        period: int = DEFAULT_PERIOD,
        seed: int = 0,
        min_tokens: int = MIN_WINDOW_TOKENS,
    ) -> None:
        """``bases``: name -> source; ``arms``: specs joining base names with ``+`` (each base at most once)."""
        if period < 1:
            raise ValueError(f"period must be >= 1, got {period}")
        self.bases = dict(bases)
        self.arms: dict[str, MixDraft] = {}
        for arm in arms:
            parts = arm.split("+")
            missing = [p for p in parts if p not in self.bases]
            if missing or len(set(parts)) != len(parts):
                raise ValueError(f"arm {arm!r} needs distinct sources among {sorted(self.bases)}")
            self.arms[arm] = MixDraft([self.bases[p] for p in parts])
        wide = maximal_arms(list(self.arms))
        self._bandits = {True: DraftBandit(list(self.arms), seed=seed), False: DraftBandit(wide, seed=seed)}
        self.period, self.min_tokens = period, min_tokens
        self.learns = any(b.learns for b in self.bases.values())
        self.wants_features = any(b.wants_features for b in self.bases.values())
        self.feature_taps = MixDraft(list(self.bases.values())).feature_taps  # one kind of features for every arm
        self.cost_weight = 1.0
        self.arm = ""  # playing now
        self.history: list[str] = []
        self._window = (0, 0, 0.0)  # verifications, tokens, draft cost at the window's start
        self._verifications = self._tokens = 0

    @property
    def bandit(self) -> DraftBandit:
        """The bandit for the current mode: every arm when draft cost counts, the maximal arms when it is free."""
        return self._bandits[self.cost_weight > 0]

    @property
    def forwards(self) -> int:  # type: ignore[override]
        return sum(b.forwards for b in self.bases.values())

    @property
    def cost(self) -> float:  # type: ignore[override]
        return sum(b.cost for b in self.bases.values())

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self.history)

    def set_mode(self, mode: str) -> None:
        if cost_weight(mode) != self.cost_weight:
            self._close_window()  # the window so far belongs to the other mode's bandit
            self.arm = ""
        self.cost_weight = cost_weight(mode)
        for b in self.bases.values():
            b.set_mode(mode)

    # -- the bandit's windows --------------------------------------------------------------------------------
    def _close_window(self) -> None:
        v0, t0, c0 = self._window
        n = self._verifications - v0
        if self.arm and n > 0:
            self.bandit.update(self.arm, window_reward(self._tokens - t0, n, self.cost - c0, self.cost_weight))
        self._window = (self._verifications, self._tokens, self.cost)

    def _choose(self) -> None:
        self._close_window()
        choice = self.bandit.choose()
        self.arm = choice.arm
        self.history.append(f"@{self._verifications}: {choice.describe()}")

    # -- the draft interface -----------------------------------------------------------------------------
    def start(self, prompt: Sequence[int]) -> None:
        for b in self.bases.values():
            b.start(prompt)
        self._close_window()  # the previous request's last (partial) window counts too
        self.history = []
        self._verifications = self._tokens = 0
        self._window = (0, 0, self.cost)
        self.arm = ""
        self._choose()

    def propose(self, tree: TokenTree, committed: Sequence[int], budget: int) -> int:
        if not self.arm:
            self._choose()
        return self.arms[self.arm].propose(tree, committed, budget)

    def observe(self, verification: Verification, committed: Sequence[int]) -> None:
        for b in self.bases.values():
            b.observe(verification, committed)
        self._verifications += 1
        self._tokens += len(verification.emitted)
        v0, t0, _ = self._window
        if self._verifications - v0 >= self.period and self._tokens - t0 >= self.min_tokens:
            self._choose()

    def learn(
        self, tokens: Sequence[int], top_tokens: Sequence[Sequence[int]], top_logprobs: Sequence[Sequence[float]]
    ) -> None:
        for b in self.bases.values():
            b.learn(tokens, top_tokens, top_logprobs)

    def prefix_features(self, start: int, hidden: Any) -> None:
        for b in self.bases.values():
            b.prefix_features(start, hidden)
        v0, t0, _ = self._window
        if self._verifications == v0:  # the prompt's processing (a head's prompt rows) is no arm's draft cost
            self._window = (v0, t0, self.cost)

    def tree_features(self, nodes: Sequence[int], hidden: Any) -> None:
        for b in self.bases.values():
            b.tree_features(nodes, hidden)

    def save(self) -> None:
        for b in self.bases.values():
            b.save()


def maximal_arms(arms: Sequence[str]) -> list[str]:
    """The arms whose bases are not all in another arm, in the order given."""
    sets = [frozenset(a.split("+")) for a in arms]
    return [a for a, s in zip(arms, sets, strict=True) if not any(s < other for other in sets)]
