"""Several draft sources growing one tree (``ngram+recycle``): each proposes in turn, in the order given, with
what is left of the step's budget; a node proposed by two sources is one node (the first one's score). Every
source learns from every verification."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from homespec.core.tree import TokenTree, Verification
from homespec.errors import DraftError
from homespec.model.drafts.base import DraftSource


class MixDraft(DraftSource):
    def __init__(self, sources: Sequence[DraftSource]) -> None:
        self.sources = list(sources)
        self.name = "+".join(s.name for s in self.sources)
        self.learns = any(s.learns for s in self.sources)
        self.wants_features = any(s.wants_features for s in self.sources)
        kinds = {s.feature_taps for s in self.sources if s.wants_features}
        if len(kinds) > 1:  # one Result carries one kind of features
            raise DraftError(
                f"{self.name}: an EAGLE-3 head and a head that reads the last hidden states cannot draft together",
                hint="mix an EAGLE-3 head with table sources only (e.g. ngram+eagle:PATH)",
            )
        self.feature_taps = kinds.pop() if kinds else ()

    @property
    def forwards(self) -> int:  # type: ignore[override]
        return sum(s.forwards for s in self.sources)

    @property
    def cost(self) -> float:  # type: ignore[override]
        return sum(s.cost for s in self.sources)

    def set_mode(self, mode: str) -> None:
        for s in self.sources:
            s.set_mode(mode)

    def start(self, prompt: Sequence[int]) -> None:
        for s in self.sources:
            s.start(prompt)

    def propose(self, tree: TokenTree, committed: Sequence[int], budget: int) -> int:
        added = 0
        for s in self.sources:
            if added >= budget:
                break
            added += s.propose(tree, committed, budget - added)
        return added

    def observe(self, verification: Verification, committed: Sequence[int]) -> None:
        for s in self.sources:
            s.observe(verification, committed)

    def learn(
        self, tokens: Sequence[int], top_tokens: Sequence[Sequence[int]], top_logprobs: Sequence[Sequence[float]]
    ) -> None:
        for s in self.sources:
            s.learn(tokens, top_tokens, top_logprobs)

    def prefix_features(self, start: int, hidden: Any) -> None:
        for s in self.sources:
            s.prefix_features(start, hidden)

    def tree_features(self, nodes: Sequence[int], hidden: Any) -> None:
        for s in self.sources:
            s.tree_features(nodes, hidden)

    def save(self) -> None:
        for s in self.sources:
            s.save()
