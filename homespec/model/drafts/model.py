"""Model drafts: a small causal LM (``model:PATH``) or the target's own first k layers (``early-exit``).

Both are a ``Stage`` with embeddings and a head, with a tree-aware KV cache of their own that mirrors the
request's token tree. Each ``propose`` runs up to ``depth`` rounds, EAGLE-2 style: run the frontier nodes
through the draft, take each one's top ``width`` next tokens, keep the ``width`` best children overall by
cumulative log-prob (the draft's own greedy child always among them), and make them the next frontier; stop
early when the draft's greedy path falls below ``min_prob``. After a verification the draft keeps the KV of the accepted
nodes it computed, drops the rest, and catches its prefix up with the committed tokens it never saw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from homespec.core.step import DEFAULT_MAX_TREE
from homespec.core.tree import NodeId, TokenTree, Verification
from homespec.model.drafts.base import DraftSource
from homespec.model.kv import TreeKVCache
from homespec.model.stage import Stage

_PREFIX_CHUNK = 256


class ModelDraft(DraftSource):
    def __init__(
        self,
        stage: Stage,
        name: str,
        depth: int = 6,
        width: int = 4,
        max_context: int = 4096,
        min_prob: float = 0.0,
        unit: float = 0.0,
    ) -> None:
        """``unit``: the cost of one draft forward in target forwards (``base.forward_params`` ratio)."""
        if not (stage.has_embed and stage.has_head):
            raise ValueError("a draft stage needs embeddings and a head")
        self.stage, self.name, self.depth, self.width = stage, name, depth, width
        self.max_context = max_context
        self.min_logp = math.log(min_prob) if min_prob > 0 else -math.inf
        self.cache: TreeKVCache | None = None
        self.columns: torch.Tensor | None = None  # the token id of each column of ``_run``'s log-probs (None: all)
        self.forwards = 0  # draft forward passes (waves and prefix chunks), for stats
        self.unit = unit

    def start(self, prompt: Sequence[int]) -> None:
        if self.cache is None or self.cache.max_prefix < self.max_context:
            self.cache = self.stage.new_cache(self.max_context, DEFAULT_MAX_TREE)
        else:
            self.cache.reset()

    def propose(self, tree: TokenTree, committed: Sequence[int], budget: int) -> int:
        cache = self._catch_up(committed)
        frontier = self._frontier(tree)
        chain = frontier[0] if frontier else None  # the draft's own greedy path: always extended first
        added = 0
        for _ in range(self.depth):
            if not frontier or added >= budget:
                break
            logp = self._run(cache, tree, frontier)  # [len(frontier), vocab]
            top_lp, top_tok = torch.topk(logp, self.width, dim=-1)  # [f, width] each
            if self.columns is not None:
                top_tok = self.columns[top_tok]
            candidates = [
                (tree.node(f).score + float(top_lp[i, j]), float(top_lp[i, j]), f, int(top_tok[i, j]))
                for i, f in enumerate(frontier)
                for j in range(self.width)
            ]
            best = candidates[frontier.index(chain) * self.width] if chain in frontier else None
            if best is not None and best[0] < self.min_logp:
                break  # even the draft's own best path is too unlikely to be worth a wave row
            rest = sorted((c for c in candidates if c is not best), key=lambda c: -c[0])
            frontier = []
            for _, lp, parent, token in ([best] if best else [])[: budget - added] + rest[: self.width - 1]:
                if added >= budget:
                    break
                node, created = tree.add(parent, token, lp, self.name)
                added += int(created)
                if parent == chain and best is not None and token == best[3]:
                    chain = node
                frontier.append(node)
        return added

    def observe(self, verification: Verification, committed: Sequence[int]) -> None:
        """Keep the accepted nodes this draft computed (a prefix of the path) and the surviving subtree."""
        assert self.cache is not None
        cache = self.cache
        path: list[int] = []
        for node in verification.committed:
            if node not in cache.slot_of:
                break
            path.append(node)
        if len(path) < len(verification.committed):
            cache.commit(path, dead=list(cache.tree_ids))  # the prefix will be caught up from the tokens
        else:
            cache.commit(path, dead=verification.dead)

    # -- internals -----------------------------------------------------------------------------------------
    def _catch_up(self, committed: Sequence[int]) -> TreeKVCache:
        """Make the draft's prefix hold every committed token but the root."""
        if self.cache is None:
            self.start(committed)
        assert self.cache is not None
        cache = self.cache
        target = len(committed) - 1
        if cache.prefix_len < target and cache.tree_len:
            cache.drop(list(cache.tree_ids))
        while cache.prefix_len < target:
            a = cache.prefix_len
            b = min(target, a + _PREFIX_CHUNK)
            self.stage.forward_prefix(cache, torch.tensor(committed[a:b]), range(a, b))
            self.forwards += 1
            self.cost += self.unit
        return cache

    def _frontier(self, tree: TokenTree) -> list[NodeId]:
        """The best leaves not yet run through this draft (just the root for a fresh tree)."""
        assert self.cache is not None
        leaves = [tree.node(i) for i in tree.leaves() if i not in self.cache.slot_of]
        leaves.sort(key=lambda n: (-n.score, n.id))
        return [n.id for n in leaves[: self.width]]

    def _run(self, cache: TreeKVCache, tree: TokenTree, nodes: list[NodeId]) -> torch.Tensor:
        """Draft log-probs for nodes; ancestors the draft has not computed are run in the same wave."""
        need: list[NodeId] = []
        for node in nodes:
            chain = [node, *tree.ancestors(node)]
            need.extend(n for n in chain if n not in cache.slot_of and n not in need)
        need.sort(key=lambda i: (tree.node(i).position, i))
        rows = tree.rows(need)
        logits = self.stage.forward_tree(cache, rows, torch.tensor([r.token for r in rows]))
        self.forwards += 1
        self.cost += self.unit
        index = {n: i for i, n in enumerate(need)}
        picked = logits[[index[n] for n in nodes]]  # [len(nodes), vocab]
        return torch.log_softmax(picked.float(), dim=-1)
