"""Prompt lookup (n-gram) drafting: match the last n tokens in prompt + output and propose what followed.

Strong where the output repeats its input: summaries, RAG, translation, code edits. All matching continuations
for the longest matching n are merged into a trie; a branch's log-prob is log(count(child) / count(parent)),
so frequent continuations rank first; the trie is added best-first within the budget.

A lone continuation's token scores log(0.9) at first; then its factor is the rate at which this request's prompt
lookup children continuing a match of the same length have been right (a prior of 0.9 worth 4 children, for each
length). Where the reply copies its input (extraction) the rate of the long matches stays high and the copy goes
deep into the waves, while a 1-token match's guess (a word that happened to occur before) earns its own, lower
rate; where the reply only quotes a word here and there (a summary) prompt lookup's guesses sink below the other
sources' in a mixed, score-ordered wave.

It continues the leaves it has not continued yet, best-scored first (``width`` per call), and the ends of its own
copies: in a union another source may have put children under the end of a copy, and the copy is still its to go
on with.
Measured (BENCHMARKS.md §3, specpipe S = 8): on the extraction prompt (96 tokens) ``auto`` took 109 steps where
prompt lookup alone took 87, its copy held to depth ~10-20 against ~50 alone; with the rates by match length and
the copies' ends continued, 82 (prompt lookup alone: 87). On the 12 dev prompts ``auto`` went from 1101 steps to
1052, on 18 other dev prompts from 1562 to 1560.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Sequence

from homespec.core.tree import Node, NodeId, TokenTree, Verification
from homespec.model.drafts.base import DraftSource

_PRIOR_RATE = 0.9  # a single continuation's tokens, before this request says otherwise
_CONTINUATION_DECAY = math.log(_PRIOR_RATE)
_PRIOR_WEIGHT = 4.0  # children that prior is worth


def find_continuations(
    tokens: Sequence[int], max_n: int, min_n: int, length: int, limit: int
) -> tuple[int, list[list[int]]]:
    """The longest suffix n-gram (max_n down to min_n) of ``tokens`` that occurred before, and the continuations (up
    to ``length`` tokens, most recent match first, at most ``limit``) that followed it; (0, []) if none."""
    size = len(tokens)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        suffix = list(tokens[size - n :])
        last = suffix[-1]
        found: list[list[int]] = []
        for end in range(size - 2, n - 2, -1):  # end: index of the match's last token, before the suffix
            if tokens[end] == last and list(tokens[end - n + 1 : end + 1]) == suffix:
                found.append(list(tokens[end + 1 : end + 1 + length]))
                if len(found) >= limit:
                    break
        if found:
            return n, found
    return 0, []


class NgramDraft(DraftSource):
    name = "ngram"

    def __init__(self, max_n: int = 3, min_n: int = 1, depth: int = 8, width: int = 4) -> None:
        self.max_n, self.min_n, self.depth, self.width = max_n, min_n, depth, width
        self._expanded: set[NodeId] = set()
        # nodes this source made whose parent's result is not known yet -> (parent, length of the match they continue)
        self._parent: dict[NodeId, tuple[NodeId, int]] = {}
        # by match length: this request's children whose parent was committed, and how many were right
        self.hits: Counter[int] = Counter()
        self.trials: Counter[int] = Counter()

    def start(self, prompt: Sequence[int]) -> None:
        self._expanded, self._parent = set(), {}
        self.hits, self.trials = Counter(), Counter()

    def rate(self, n: int) -> float:
        """How often this request's prompt lookup children continuing a match of ``n`` tokens have been the target's
        token (with the prior)."""
        return (self.hits[n] + _PRIOR_WEIGHT * _PRIOR_RATE) / (self.trials[n] + _PRIOR_WEIGHT)

    def propose(self, tree: TokenTree, committed: Sequence[int], budget: int) -> int:
        added = 0
        leaves = [n for n in tree if n.id not in self._expanded and self._open_end(tree, n)]
        leaves.sort(key=lambda n: (-n.score, n.id))
        for leaf in leaves[: self.width]:
            if added >= budget:
                break
            self._expanded.add(leaf.id)
            context = [*committed, *tree.path_tokens(leaf.id)[1:]]
            n, continuations = find_continuations(context, self.max_n, self.min_n, self.depth, 2 * self.width)
            made: dict[NodeId, NodeId] = {}
            offset = math.log(self.rate(n) / _PRIOR_RATE)
            added += _add_trie(tree, leaf.id, continuations, budget - added, self.name, offset, made)
            self._parent.update((node, (parent, n)) for node, parent in made.items())
        return added

    def _open_end(self, tree: TokenTree, node: Node) -> bool:
        """A leaf, or the end of one of its own copies under which only other sources have proposed (in a union,
        the copy is still its to go on with)."""
        if not node.children:
            return True
        return node.source == self.name and all(tree.node(c).source != self.name for c in node.children.values())

    def observe(self, verification: Verification, committed: Sequence[int]) -> None:
        gone = set(verification.dead) | set(verification.committed)
        self._expanded -= gone
        done = set(verification.committed)  # their results are known: each child of one is right or wrong
        right = done | ({verification.root} if not verification.flushed else set())
        for node, (parent, n) in list(self._parent.items()):
            if parent in done:
                self.trials[n] += 1
                self.hits[n] += node in right
                del self._parent[node]
            elif node in gone:
                del self._parent[node]


def _add_trie(
    tree: TokenTree,
    parent: NodeId,
    continuations: list[list[int]],
    budget: int,
    source: str,
    offset: float = 0.0,
    made: dict[NodeId, NodeId] | None = None,
) -> int:
    """Merge continuations into a trie under ``parent`` and add its nodes best-first, at most ``budget``; each
    token's log-prob gets ``offset``; ``made`` records each new node's parent."""
    trie: dict[tuple[int, ...], int] = {}
    for cont in continuations:
        for d in range(1, len(cont) + 1):
            trie[tuple(cont[:d])] = trie.get(tuple(cont[:d]), 0) + 1
    total = len(continuations)
    heap: list[tuple[float, tuple[int, ...]]] = []

    def push(prefix: tuple[int, ...], parent_score: float, parent_count: int) -> None:
        for key, count in trie.items():
            if len(key) == len(prefix) + 1 and key[:-1] == prefix:
                logp = math.log(count / parent_count) + (_CONTINUATION_DECAY if parent_count == count else 0.0)
                logp += offset
                heapq.heappush(heap, (-(parent_score + logp), key))

    push((), 0.0, max(total, 1))
    ids: dict[tuple[int, ...], NodeId] = {(): parent}
    scores: dict[tuple[int, ...], float] = {(): 0.0}
    added = 0
    while heap and added < budget:
        neg, key = heapq.heappop(heap)
        node, created = tree.add(ids[key[:-1]], key[-1], -neg - scores[key[:-1]], source)
        ids[key], scores[key] = node, -neg
        added += int(created)
        if created and made is not None:
            made[node] = ids[key[:-1]]
        push(key, -neg, trie[key])
    return added
