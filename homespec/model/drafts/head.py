"""The ``head`` draft source: an EAGLE-style draft head (``model/head.py``) grown into a dynamic tree.

Same tree policy as the model drafts (``ModelDraft``: EAGLE-2 rounds over the best frontier, the head's own greedy
child always kept), different inputs: a row needs the feature before its token, so the target's last-layer
hidden states come back with every result (``wants_features``) and the committed text's features are kept in
order. The head's cache holds one row per committed token after the first (true features); draft rows use the
head's own predicted features and are dropped at every verification, as in EAGLE. With a draft vocabulary in the
head file (``model/head.py``) the head scores those tokens and the prompt's only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from homespec.core.step import DEFAULT_MAX_TREE
from homespec.core.tree import NodeId, TokenTree, Verification
from homespec.model.drafts.base import forward_params
from homespec.model.drafts.model import ModelDraft
from homespec.model.head import DraftHead
from homespec.model.kv import TreeKVCache
from homespec.model.quant import Weight, out_features, select_rows
from homespec.model.stage import Stage

_PREFIX_CHUNK = 256


class HeadDraft(ModelDraft):
    wants_features = True

    def __init__(
        self, head: DraftHead, ends: Stage, name: str = "head", depth: int = 6, width: int = 4, max_context: int = 4096
    ) -> None:
        """``ends``: the target's embeddings, final norm and LM head (a Stage with no layers)."""
        super().__init__(ends, name, depth, width, max_context)
        self.head = head
        self.features: list[torch.Tensor] = []  # true feature per committed position, in order
        self.node_features: dict[int, torch.Tensor] = {}  # tree node -> the target's feature, once computed
        self.predicted: dict[int, torch.Tensor] = {}  # tree node -> the head's feature (until the next verification)
        cfg = ends.source.config
        target = forward_params(cfg, ends.source.num_layers, lm_head=True)
        h = int(cfg.hidden_size)
        self.layer_unit = (forward_params(cfg, 1, lm_head=False) + 2 * h * h) / target  # fc + one layer
        self.lm_unit = self._lm_full = forward_params(cfg, 0, lm_head=True) / target
        self._head_w: Weight | None = None  # the LM head's rows for ``columns`` (a draft vocabulary)

    def start(self, prompt: Sequence[int]) -> None:
        if self.cache is None or self.cache.max_prefix < self.max_context:
            self.cache = self.head.new_cache(self.max_context, DEFAULT_MAX_TREE, self.stage.dtype, self.stage.device)
        else:
            self.cache.reset()
        if self.head.vocab is not None:  # the draft vocabulary and this prompt's own tokens (names, numbers)
            assert self.stage.head_w is not None
            ids = torch.tensor(list(prompt), dtype=torch.int64)
            columns = torch.unique(torch.cat([self.head.vocab, ids])).to(self.stage.device)
            self.columns, self._head_w = columns, select_rows(self.stage.head_w, columns)
            self.lm_unit = self._lm_full * len(columns) / out_features(self.stage.head_w)
        self.features = []
        self.node_features = {}
        self.predicted = {}

    # -- what the target tells the head ----------------------------------------------------------------------
    def prefix_features(self, start: int, hidden: torch.Tensor) -> None:
        if start != len(self.features):
            raise ValueError(f"prompt features for position {start}, expected {len(self.features)}")
        self.features.extend(self._take(hidden).unbind(0))

    def tree_features(self, nodes: Sequence[int], hidden: torch.Tensor) -> None:
        for node, h in zip(nodes, self._take(hidden).unbind(0), strict=True):
            self.node_features[node] = h

    def observe(self, verification: Verification, committed: Sequence[int]) -> None:
        for node in verification.committed:  # every committed node was computed by the target
            self.features.append(self.node_features[node])
        for node in (*verification.committed, *verification.dead):
            self.node_features.pop(node, None)
        self.predicted = {}
        if self.cache is not None and self.cache.tree_len:
            self.cache.drop(list(self.cache.tree_ids))  # draft rows used predicted features: recomputed later

    # -- the model's hooks --------------------------------------------------------------------------------
    def _catch_up(self, committed: Sequence[int]) -> TreeKVCache:
        """Head rows for the committed tokens at positions 1 .. root - 1, from their true features."""
        if self.cache is None:
            self.start(committed)
        assert self.cache is not None
        cache = self.cache
        root = len(committed) - 1
        want = min(root - 1, len(self.features) - 1)  # rows: positions 1 .. want
        if cache.prefix_len < want and cache.tree_len:
            cache.drop(list(cache.tree_ids))
        while cache.prefix_len < want:
            a = cache.prefix_len + 1  # first token position to add
            b = min(want, a + _PREFIX_CHUNK - 1)
            positions = list(range(a, b + 1))
            start, mask = cache.reserve_prefix(len(positions))
            feats = torch.stack([self.features[q - 1] for q in positions])
            self._forward(cache, [committed[q] for q in positions], feats, positions, start, mask)
        return cache

    def _frontier(self, tree: TokenTree) -> list[NodeId]:
        root = tree.root
        if root.position < 1 or len(self.features) < root.position:
            return []  # the feature before the root is not known yet (first token of a request)
        return super()._frontier(tree)

    def _run(self, cache: TreeKVCache, tree: TokenTree, nodes: list[NodeId]) -> torch.Tensor:
        """Head log-probs for ``nodes``; ancestors the head has not run are run first, one depth level at a time
        (a row's input is its parent's output)."""
        need: list[NodeId] = []
        for node in nodes:
            for n in [node, *tree.ancestors(node)]:
                if n not in cache.slot_of and n not in need:
                    need.append(n)
        by_level: dict[int, list[NodeId]] = {}
        for n in need:
            by_level.setdefault(tree.node(n).position, []).append(n)
        for position in sorted(by_level):
            level = by_level[position]
            rows = tree.rows(level)
            feats = torch.stack([self._feature_before(tree, n) for n in level])
            start, mask = cache.reserve_tree([r.node for r in rows], [r.parent for r in rows])
            out = self._forward(cache, [r.token for r in rows], feats, [r.position for r in rows], start, mask)
            self.predicted.update(zip(level, out.unbind(0), strict=True))
        self.forwards += 1
        self.cost += self.lm_unit
        return torch.log_softmax(self._logits(nodes).float(), dim=-1)

    def _take(self, hidden: torch.Tensor) -> torch.Tensor:
        """The target's features [n, hidden] as this head reads them (its last hidden states, as they come)."""
        return hidden.to(self.stage.device, self.stage.dtype)

    def _logits(self, nodes: list[NodeId]) -> torch.Tensor:
        """Logits [len(nodes), columns] after each node: the target's own where it computed the node (its true
        feature through its norm and LM head), else the head's prediction through them."""
        picked = torch.stack([self._feature_of(n) for n in nodes])
        return self.stage.logits(picked, self._head_w)

    def _feature_of(self, node: int) -> torch.Tensor:
        """The feature at a node's position: the target's if it computed the node, else the head's prediction."""
        true = self.node_features.get(node)
        return true if true is not None else self.predicted[node]

    def _feature_before(self, tree: TokenTree, node: NodeId) -> torch.Tensor:
        parent = tree.node(node).parent
        if parent is None:  # the root: its parent is the last committed position
            return self.features[tree.node(node).position - 1]
        return self._feature_of(parent)

    def _forward(
        self,
        cache: TreeKVCache,
        tokens: Sequence[int],
        feats: torch.Tensor,
        positions: Sequence[int],
        start: int,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        self.cost += self.layer_unit
        emb = self.stage.embed(torch.tensor(list(tokens), device=self.stage.device))
        cos, sin = self.stage.rope([q - 1 for q in positions])
        return self.head.run_cached(cache, emb, feats, cos, sin, start, mask)
