"""Token recycling (DESIGN §5): an adjacency table ``token -> the target's top-k next tokens`` filled from the
target's own outputs, grown into a tree best-first. Training-free; the table is the draft's whole state.

Every node the target computes (and every prompt position of the prefill) comes back with the target's top-k next
tokens and their log-probs (``DraftSource.learn``); the row for that node's token is replaced by them, so the table
always holds the latest context in which a token was seen. ``propose`` expands the tree best-first: each node's
candidate children are its token's row, scored by the node's score plus the row's log-prob, and the best
candidates over the whole tree are added until the budget is spent, each new node offering its own row in turn.

The table lives as long as the draft object (an engine keeps it across requests, as the method intends); with a
``path`` it is loaded from that file on creation and written back by ``save``.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Sequence
from pathlib import Path

from homespec.core.tree import NodeState, TokenTree
from homespec.errors import DraftError
from homespec.model.drafts.base import DraftSource

Row = tuple[tuple[int, ...], tuple[float, ...]]


class RecycleDraft(DraftSource):
    name = "recycle"
    learns = True

    def __init__(self, k: int = 8, max_depth: int = 16, path: Path | None = None) -> None:
        self.k, self.max_depth, self.path = k, max_depth, path
        self.table: dict[int, Row] = {}
        if path is not None and path.is_file():
            self.table = _load(path)

    def learn(
        self, tokens: Sequence[int], top_tokens: Sequence[Sequence[int]], top_logprobs: Sequence[Sequence[float]]
    ) -> None:
        for token, nxt, lp in zip(tokens, top_tokens, top_logprobs, strict=True):
            self.table[int(token)] = (tuple(int(t) for t in nxt[: self.k]), tuple(float(x) for x in lp[: self.k]))

    def propose(self, tree: TokenTree, committed: Sequence[int], budget: int) -> int:
        if budget <= 0 or not self.table:
            return 0
        root_pos = tree.root.position
        heap: list[tuple[float, int, int, int, float]] = []  # (-score, position, parent, token, logp)

        def offer(node_id: int) -> None:
            node = tree.node(node_id)
            row = self.table.get(node.token)
            if row is None or node.position - root_pos >= self.max_depth:
                return
            for token, lp in zip(*row, strict=True):
                if token not in node.children:
                    heapq.heappush(heap, (-(node.score + lp), node.position, node.id, token, lp))

        for node in tree:
            if node.state is not NodeState.DONE:
                offer(node.id)
        added = 0
        while heap and added < budget:
            _, _, parent, token, lp = heapq.heappop(heap)
            if token in tree.node(parent).children:
                continue  # another offer of the same child
            node_id, _ = tree.add(parent, token, lp, self.name)
            added += 1
            offer(node_id)
        return added

    def save(self, path: Path | None = None) -> None:
        target = path or self.path
        if target is None:
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        rows = {str(t): [list(nxt), list(lp)] for t, (nxt, lp) in self.table.items()}
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps({"k": self.k, "rows": rows}))
        tmp.replace(target)


def _load(path: Path) -> dict[int, Row]:
    try:
        data = json.loads(path.read_text())
        return {
            int(t): (tuple(int(x) for x in nxt), tuple(float(x) for x in lp)) for t, (nxt, lp) in data["rows"].items()
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DraftError(f"recycle table {path} is unreadable: {exc}", hint="delete it; it is rebuilt") from exc
