"""Tree speculative decoding with the whole target in this process (mode ``ar``; with S in-process stages it is
the single-host form of mode ``tree``): draft a tree, run it through the stages as one wave, verify, commit.

This is a shell: the tree, the wave and the verification walk are ``core.tree``'s; the math is ``model``'s.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from homespec.config import SamplingConfig, TreeConfig
from homespec.core.tree import NodeState, TokenTree, Verification
from homespec.errors import CapacityError
from homespec.events import TokenLogprob
from homespec.model.drafts.base import DraftSource
from homespec.model.kv import TreeKVCache
from homespec.model.sampling import next_tokens, token_logprobs, top_logprobs
from homespec.model.stage import Stage

PREFIX_CHUNK = 256


@dataclass(frozen=True)
class DecodeStep:
    verification: Verification
    wave_size: int  # nodes in the wave these results belong to
    tick: int  # pipeline steps elapsed when the results were verified (in process: target forwards)
    logprobs: tuple[TokenLogprob, ...] = ()  # one per emitted token
    stage_busy: tuple[float, ...] = ()  # per stage, its busy seconds so far (utilization over time)
    tree: tuple[NodeRow, ...] | None = None  # traced requests: the tree as this verification found it


#: (node id, parent id or -1, token, state, the last stage its wave went through: -1 drafted, the last one when done)
NodeRow = tuple[int, int, int, str, int]


def tree_rows(tree: TokenTree, stage_of: dict[int, int], done: int) -> tuple[NodeRow, ...]:
    """The tree before verification, for a TreeSnapshot: every node with its state and where its wave is."""
    return tuple(
        (
            n.id,
            -1 if n.parent is None else n.parent,
            n.token,
            n.state.value,
            done if n.state is NodeState.DONE else stage_of.get(n.id, -1),
        )
        for n in tree
    )


class InProcessDecoder:
    """Runs requests one at a time over a chain of in-process stages (the last one has the head)."""

    def __init__(self, stages: Sequence[Stage], max_context: int = 4096, max_tree: int = 256) -> None:
        self.busy = [0.0] * len(stages)  # seconds each in-process stage has computed
        if not stages or not stages[0].has_embed or not stages[-1].has_head:
            raise ValueError("the stage chain must start with embeddings and end with a head")
        self.stages = list(stages)
        self.max_tree = max_tree
        self.max_context = max_context
        self.caches: list[TreeKVCache] = [s.new_cache(max_context, max_tree) for s in self.stages]
        self.open_requests = 0  # 1 while a request holds the caches

    def decode(
        self,
        prompt: Sequence[int],
        draft: DraftSource,
        sampling: SamplingConfig,
        tree_cfg: TreeConfig,
        trace: bool = False,
        max_new: int | None = None,
    ) -> Iterator[DecodeStep]:
        """Yield one DecodeStep per target forward until the context is full; the caller stops when it has enough
        (``max_new``: it stops after that many tokens, so nothing past them is drafted)."""
        if not prompt:
            raise ValueError("empty prompt")
        self.open_requests = 1
        try:
            yield from self._decode(
                prompt, draft, sampling, tree_cfg, trace, room_end(prompt, max_new, self.max_context)
            )
        finally:
            self.open_requests = 0

    def _decode(
        self,
        prompt: Sequence[int],
        draft: DraftSource,
        sampling: SamplingConfig,
        tree_cfg: TreeConfig,
        trace: bool,
        max_position: int,
    ) -> Iterator[DecodeStep]:
        for cache in self.caches:
            cache.reset()
        draft.start(prompt)
        self._prefill(prompt[:-1], draft)
        tree = TokenTree(prompt[-1], len(prompt) - 1, max_position=max_position)
        committed = list(prompt)
        budget = min(tree_cfg.budget, self.max_tree - 1)
        forwards = 0
        while True:
            draft.propose(tree, committed, budget)
            wave = tree.ready()
            if tree.root.position > max_position + 1:
                raise CapacityError(f"the context of {self.max_context} tokens is full")
            tree.mark_sent(wave)
            rows = tree.rows(wave)
            x: torch.Tensor = torch.tensor([r.token for r in rows])
            for i, (stage, cache) in enumerate(zip(self.stages, self.caches, strict=True)):
                started = time.perf_counter()
                x = stage.forward_tree(cache, rows, x)
                self.busy[i] += time.perf_counter() - started
            picked = next_tokens(x, [r.position for r in rows], sampling)
            for row, token in zip(rows, picked, strict=True):
                tree.set_result(row.node, token)
            top_t, top_lp, chosen = top_logprobs(x, chosen=picked)
            top_t_l, top_lp_l = top_t.tolist(), top_lp.tolist()
            logprobs = dict(zip(wave, token_logprobs(picked, chosen, top_t_l, top_lp_l), strict=True))
            if draft.learns:
                draft.learn([r.token for r in rows], top_t_l, top_lp_l)
            if draft.wants_features:
                draft.tree_features([r.node for r in rows], self.stages[-1].last_hidden)
            snapshot = tree_rows(tree, {}, len(self.stages) - 1) if trace else None
            v = tree.verify()
            for cache in self.caches:
                cache.commit(v.committed, v.dead)
            committed.extend(v.emitted)
            draft.observe(v, committed)
            forwards += 1
            lps = tuple(logprobs[n] for n in v.committed)
            yield DecodeStep(v, len(wave), forwards, lps, tuple(self.busy), snapshot)

    def _prefill(self, tokens: Sequence[int], draft: DraftSource) -> None:
        for a in range(0, len(tokens), PREFIX_CHUNK):
            chunk = tokens[a : a + PREFIX_CHUNK]
            x: torch.Tensor = torch.tensor(list(chunk))
            for stage, cache in zip(self.stages, self.caches, strict=True):
                x = stage.forward_prefix(cache, x, range(a, a + len(chunk)))
            _learn(draft, chunk, x)
            if draft.wants_features:
                draft.prefix_features(a, self.stages[-1].last_hidden)


def room_end(prompt: Sequence[int], max_new: int | None, max_context: int) -> int:
    """The deepest position a draft node may be sent at (``TokenTree.max_position``): a request writes tokens up to
    position min(len(prompt) + max_new, max_context) - 1, computed from nodes up to one before it."""
    end = max_context if max_new is None else min(max_context, len(prompt) + max_new)
    return end - 2


def _learn(draft: DraftSource, tokens: Sequence[int], logits: torch.Tensor) -> None:
    """Tell the draft the target's top next tokens after each token (logits [n, vocab])."""
    if not draft.learns:
        return
    top_t, top_lp, _ = top_logprobs(logits)
    draft.learn(tokens, top_t.tolist(), top_lp.tolist())
