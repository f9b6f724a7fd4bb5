"""Tree speculative decoding with the whole target in this process (mode ``ar``; with S in-process stages it is
the single-host form of mode ``tree``): an executor of ``core.step.StepMachine`` in mode ``tree`` at latency 1.

Each tick the machine verifies the wave of the tick before and drafts the next; this module runs the wave through
the stages at once, picks the target's next token per node (``model.sampling``) and hands the results back, and
commits the caches when the machine prunes. The decisions are all the machine's; the math is ``model``'s.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

from homespec.config import SamplingConfig, TreeConfig
from homespec.core.step import (
    PREFIX_STEP,
    DecodeStep,
    Draft,
    Emit,
    EndRequest,
    Fail,
    SendPrefix,
    SendPrune,
    SendWave,
    StageResult,
    StepMachine,
)
from homespec.errors import CapacityError
from homespec.model.kv import TreeKVCache
from homespec.model.sampling import next_tokens, top_logprobs
from homespec.model.stage import Stage

REQUEST = 1  # the one request in flight


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
        draft: Draft,
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
            yield from self._decode(prompt, draft, sampling, tree_cfg, trace, max_new)
        finally:
            self.open_requests = 0

    def _decode(
        self,
        prompt: Sequence[int],
        draft: Draft,
        sampling: SamplingConfig,
        tree_cfg: TreeConfig,
        trace: bool,
        max_new: int | None,
    ) -> Iterator[DecodeStep]:
        for cache in self.caches:
            cache.reset()
        machine = StepMachine(
            "tree", latency=1, stages=len(self.stages), max_tree=self.max_tree, max_context=self.max_context
        )
        for action in machine.join(REQUEST, prompt, draft, tree_cfg.budget, 0, max_new, trace):
            assert isinstance(action, SendPrefix)
            machine.deliver(self._prefix(action, draft.learns, draft.wants_features))
        tick = 0
        while True:
            for action in [*machine.collect(tick), *machine.inject(tick)]:
                if isinstance(action, SendWave):
                    machine.deliver(self._wave(action, sampling, draft.wants_features))
                elif isinstance(action, SendPrune):
                    for cache in self.caches:
                        cache.commit(action.committed, action.dead)
                elif isinstance(action, Emit):
                    yield action.step
                elif isinstance(action, Fail):
                    raise CapacityError(action.why)
                elif not isinstance(action, EndRequest):
                    raise AssertionError(f"unexpected action {action!r}")
            tick += 1

    def _prefix(self, chunk: SendPrefix, learns: bool, features: bool) -> StageResult:
        x: torch.Tensor = torch.tensor(list(chunk.tokens))
        positions = range(chunk.start, chunk.start + len(chunk.tokens))
        for stage, cache in zip(self.stages, self.caches, strict=True):
            x = stage.forward_prefix(cache, x, positions)
        top_t: list[list[int]] = []
        top_lp: list[list[float]] = []
        if learns:
            t, lp, _ = top_logprobs(x)
            top_t, top_lp = t.tolist(), lp.tolist()
        hidden = self.stages[-1].last_hidden if features else None
        return StageResult(REQUEST, PREFIX_STEP, top_tokens=top_t, top_logprobs=top_lp, hidden=hidden)

    def _wave(self, wave: SendWave, sampling: SamplingConfig, features: bool) -> StageResult:
        rows = wave.rows
        x: torch.Tensor = torch.tensor([r.token for r in rows])
        for i, (stage, cache) in enumerate(zip(self.stages, self.caches, strict=True)):
            started = time.perf_counter()
            x = stage.forward_tree(cache, rows, x)
            self.busy[i] += time.perf_counter() - started
        picked = next_tokens(x, [r.position for r in rows], sampling)
        top_t, top_lp, chosen = top_logprobs(x, chosen=picked)
        return StageResult(
            REQUEST,
            wave.step,
            nodes=tuple(r.node for r in rows),
            next_tokens=tuple(picked),
            next_logprobs=tuple(chosen),
            top_tokens=top_t.tolist(),
            top_logprobs=top_lp.tolist(),
            hidden=self.stages[-1].last_hidden if features else None,
            busy_s=tuple(self.busy),
        )
