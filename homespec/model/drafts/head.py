"""The ``head`` draft source: an EAGLE-style draft head (``model/head.py``) grown into a dynamic tree.

Same tree policy as the model drafts (``ModelDraft``: EAGLE-2 rounds over the best frontier, the head's own greedy
child always kept), different inputs: a row needs the feature before its token, so the target's last-layer
hidden states come back with every result (``wants_features``) and the committed text's features are kept in
order. The head's cache holds one row per committed token after the first (true features) and a row per tree node it
ran (the parent's feature: the target's where it computed the parent, else the head's own prediction). A
verification moves the accepted path's rows into the prefix (rewriting those that read a prediction) and keeps the
surviving subtree's: in ``specpipe``, where a tree outlives many verifications, a step runs only the new frontier,
not every level down to it again (BENCHMARKS.md §2). The prompt's rows run when the target's prefill hands over its
features. With a draft vocabulary in the head file (``model/head.py``) the head scores those tokens and the prompt's
only, in ``ar`` (where its forwards cost the target time); beside a pipeline it scores every token. On a CPU the
head's forwards run through the native glue (``DraftHead.use_glue``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from homespec.core.bandit import cost_weight
from homespec.core.step import DEFAULT_MAX_TREE
from homespec.core.tree import NodeId, TokenTree, Verification
from homespec.model.drafts.base import forward_params
from homespec.model.drafts.model import ModelDraft
from homespec.model.head import DraftHead
from homespec.model.kv import TreeKVCache
from homespec.model.quant import Weight, out_features, select_rows
from homespec.model.stage import Stage

_PREFIX_CHUNK = 256
#: the head extends a leaf only if fewer than this many of its ancestors lack a row and a target feature: each costs a
#: sequential head forward (a row reads its parent's output), and deep chains of other sources' guesses are better
#: left to them. Measured (BENCHMARKS.md §2, specpipe S = 8, ``auto``): no limit 1093 steps, 3 1045, 1 1051.
_CHASE = 3


class HeadDraft(ModelDraft):
    wants_features = True

    def __init__(
        self, head: DraftHead, ends: Stage, name: str = "head", depth: int = 6, width: int = 4, max_context: int = 4096
    ) -> None:
        """``ends``: the target's embeddings, final norm and LM head (a Stage with no layers)."""
        super().__init__(ends, name, depth, width, max_context)
        self.head = head
        # on a CPU the head's forwards run through the native glue where it builds, in fp32 activations (its
        # cache and the features it keeps) whatever the target's dtype
        self.glued = ends.device == "cpu" and head.use_glue()
        self.dtype = torch.float32 if self.glued else ends.dtype
        self.features: list[torch.Tensor] = []  # true feature per committed position, in order
        self.node_features: dict[int, torch.Tensor] = {}  # tree node -> the target's feature, once computed
        self.predicted: dict[int, torch.Tensor] = {}  # tree node -> the head's feature (while its row is kept)
        self.row_true: dict[int, bool] = {}  # tree node with a row -> whether that row read the target's feature
        cfg = ends.source.config
        target = forward_params(cfg, ends.source.num_layers, lm_head=True)
        h = int(cfg.hidden_size)
        self.layer_unit = (forward_params(cfg, 1, lm_head=False) + 2 * h * h) / target  # fc + one layer
        self.lm_unit = self._lm_full = forward_params(cfg, 0, lm_head=True) / target
        self._head_w: Weight | None = None  # the LM head's rows for ``columns`` (a draft vocabulary)
        self.vocab_on = True  # score the draft vocabulary only, if the head has one (``set_mode``)
        self._prompt: list[int] = []  # the request's prompt until its rows are run (``prefix_features``)

    def start(self, prompt: Sequence[int]) -> None:
        if self.cache is None or self.cache.max_prefix < self.max_context:
            self.cache = self.head.new_cache(self.max_context, DEFAULT_MAX_TREE, self.dtype, self.stage.device)
        else:
            self.cache.reset()
        self.columns, self._head_w, self.lm_unit = None, None, self._lm_full
        if self.head.vocab is not None and self.vocab_on:  # the draft vocabulary and the prompt's own tokens
            assert self.stage.head_w is not None
            ids = torch.tensor(list(prompt), dtype=torch.int64)
            columns = torch.unique(torch.cat([self.head.vocab, ids])).to(self.stage.device)
            self.columns, self._head_w = columns, select_rows(self.stage.head_w, columns)
            self.lm_unit = self._lm_full * len(columns) / out_features(self.stage.head_w)
        self.features = []
        self.node_features = {}
        self.predicted = {}
        self.row_true = {}
        # the head's rows for the prompt are prompt processing: run when the target's prefill hands over its
        # features (``prefix_features``), not in the first step's drafting
        self._prompt = list(prompt)

    def set_mode(self, mode: str) -> None:
        """A draft vocabulary scores fewer tokens where the head's forwards cost the target time (``ar``); beside a
        pipeline every token is scored (BENCHMARKS.md §3: there the smaller vocabulary's renormalized scores rank
        the head's nodes above prompt lookup's and cost steps)."""
        self.vocab_on = cost_weight(mode) > 0

    # -- what the target tells the head ----------------------------------------------------------------------
    def prefix_features(self, start: int, hidden: torch.Tensor) -> None:
        if start != len(self.features):
            raise ValueError(f"prompt features for position {start}, expected {len(self.features)}")
        self.features.extend(self._take(hidden).unbind(0))
        if self._prompt and len(self.features) >= len(self._prompt):  # the whole prompt: its rows now, in prefill
            self._catch_up(self._prompt)
            self._prompt = []

    def tree_features(self, nodes: Sequence[int], hidden: torch.Tensor) -> None:
        for node, h in zip(nodes, self._take(hidden).unbind(0), strict=True):
            self.node_features[node] = h

    def observe(self, verification: Verification, committed: Sequence[int]) -> None:
        """Keep the head's rows: the accepted path's move into its prefix, the surviving subtree's stay (their
        predicted features too), the dead ones go. Prefix rows that read a predicted feature are written again
        from the target's (one forward: a row's keys and values depend on its own input only); the rows kept in
        the tree keep what they read, as EAGLE's draft does within a step. Only when the head's cache does not
        hold the whole path (it never ran those nodes) does it start the tree again and catch up."""
        for node in verification.committed:  # every committed node was computed by the target
            self.features.append(self.node_features[node])
        cache = self.cache
        if cache is not None and cache.tree_len and verification.committed:
            path = list(verification.committed)
            root = len(committed) - len(verification.emitted) - 1  # the old root's position
            if all(n in cache.slot_of for n in path) and cache.prefix_len == root - 1:
                stale = [i for i, n in enumerate(path) if not self.row_true.get(n, False)]
                cache.commit(path, dead=verification.dead)
                if stale:
                    self._rewrite_prefix(root + stale[0], root + len(path) - 1, committed)
            else:
                cache.drop(list(cache.tree_ids))
        for node in (*verification.committed, *verification.dead):
            self.node_features.pop(node, None)
            self.predicted.pop(node, None)
            self.row_true.pop(node, None)
        if cache is not None and not cache.tree_len:
            self.predicted, self.row_true = {}, {}

    def _rewrite_prefix(self, first: int, last: int, committed: Sequence[int]) -> None:
        """Prefix rows for positions first .. last again, from the target's features."""
        assert self.cache is not None
        positions = list(range(first, last + 1))
        start, n = first - 1, len(positions)  # a row for position q sits in prefix slot q - 1
        mask = torch.ones(n, start + n, dtype=torch.bool, device=self.stage.device)
        mask[:, start:] = torch.ones(n, n, dtype=torch.bool, device=self.stage.device).tril()
        feats = torch.stack([self.features[q - 1] for q in positions])
        self._forward(self.cache, [committed[q] for q in positions], feats, positions, start, mask)

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
        assert self.cache is not None
        cached, known = self.cache.slot_of, self.node_features
        leaves = []
        for i in tree.leaves():
            if i in cached:
                continue
            node, rows, parent = tree.node(i), 0, tree.node(i).parent
            while parent is not None and parent not in cached and parent not in known and rows < _CHASE:
                rows, parent = rows + 1, tree.node(parent).parent
            if rows < _CHASE or parent is None:
                leaves.append(node)
        leaves.sort(key=lambda n: (-n.score, n.id))
        return [n.id for n in leaves[: self.width]]

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
            for n in level:
                parent = tree.node(n).parent
                self.row_true[n] = parent is None or parent in self.node_features
            start, mask = cache.reserve_tree([r.node for r in rows], [r.parent for r in rows])
            out = self._forward(cache, [r.token for r in rows], feats, [r.position for r in rows], start, mask)
            self.predicted.update(zip(level, out.unbind(0), strict=True))
        self.forwards += 1
        self.cost += self.lm_unit
        return torch.log_softmax(self._logits(nodes).float(), dim=-1)

    def _take(self, hidden: torch.Tensor) -> torch.Tensor:
        """The target's features [n, hidden] as this head reads them (its last hidden states, as they come)."""
        return hidden.to(self.stage.device, self.dtype)

    def _logits(self, nodes: list[NodeId]) -> torch.Tensor:
        """Logits [len(nodes), columns] after each node: the target's own where it computed the node (its true
        feature through its norm and LM head), else the head's prediction through them."""
        picked = torch.stack([self._feature_of(n) for n in nodes])
        return self.stage.logits(picked.to(self.stage.dtype), self._head_w)

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
