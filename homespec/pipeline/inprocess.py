"""Tree speculative decoding with the whole target in this process (mode ``ar``; with S in-process stages it is
the single-host form of mode ``tree``): an executor of ``core.step.StepMachine`` in mode ``tree`` at latency 1.

A step drafts and chooses a wave (the machine), runs it through the stages at once and picks the target's next
token per node (``model.sampling``), then the machine verifies it and this module commits the caches. The
decisions are all the machine's; the math is ``model``'s. One request at a time: the caches are this decoder's.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence

import torch

from homespec.config import SamplingConfig, TreeConfig
from homespec.core.step import (
    DEFAULT_MAX_TREE,
    PREFIX_STEP,
    Action,
    DecodeStep,
    Draft,
    Emit,
    Fail,
    SendPrefix,
    SendPrune,
    SendWave,
    StageResult,
    StepMachine,
    feature_request,
)
from homespec.errors import ConfigError, DraftError, HomespecError, RequestFailedError
from homespec.model.kv import TreeKVCache
from homespec.model.sampling import next_tokens, top_logprobs
from homespec.model.stage import Stage
from homespec.pipeline.solo import decode_alone


class InProcessDecoder:
    """Runs requests one at a time over a chain of in-process stages (the last one has the head)."""

    def __init__(self, stages: Sequence[Stage], max_context: int = 4096, max_tree: int = DEFAULT_MAX_TREE) -> None:
        self.busy = [0.0] * len(stages)  # seconds each in-process stage has computed
        if not stages or not stages[0].has_embed or not stages[-1].has_head:
            raise ValueError("the stage chain must start with embeddings and end with a head")
        self.stages = list(stages)
        self.max_tree = max_tree
        self.max_context = max_context
        self.caches: list[TreeKVCache] = [s.new_cache(max_context, max_tree) for s in self.stages]
        self.machine = StepMachine("tree", 1, len(self.stages), max_tree=max_tree, max_context=max_context)
        self.busy_fraction: tuple[float, ...] = ()  # per stage, for the last request that left (in process: none)
        self.tick = 0
        self._ids = 0
        self._sampling = SamplingConfig()
        self._features = False
        self._taps = False  # the request's draft reads EAGLE-3's fc sum (model/eagle.py), not the last hidden states

    @property
    def open_requests(self) -> int:
        return self.machine.open_requests

    def decode(
        self,
        prompt: Sequence[int],
        draft: Draft,
        sampling: SamplingConfig,
        tree_cfg: TreeConfig,
        trace: bool = False,
        max_new: int | None = None,
    ) -> Generator[DecodeStep, None, None]:
        """Yield one DecodeStep per target forward until the caller stops (``max_new``: it stops after that many
        tokens, so nothing past them is drafted)."""
        return decode_alone(self, prompt, draft, sampling, tree_cfg, trace, max_new)

    def join(
        self,
        prompt: Sequence[int],
        draft: Draft,
        sampling: SamplingConfig,
        tree_cfg: TreeConfig,
        trace: bool = False,
        max_new: int | None = None,
    ) -> int:
        """Start a request: its prompt goes through the stages now, and the draft learns it before it drafts."""
        if self.machine.runs:
            raise ConfigError("mode ar decodes one request at a time")
        if not prompt:
            raise ValueError("empty prompt")
        for cache in self.caches:
            cache.reset()
        self._ids += 1
        self._sampling = sampling
        self._features, self._taps = feature_request(draft)
        if self._taps:
            self._check_taps(draft.feature_taps)
        req = self._ids
        try:
            self._perform(self.machine.join(req, prompt, draft, tree_cfg.budget, self.tick, max_new, trace))
            self._perform(self.machine.collect(self.tick))  # the prompt's results: due now, at latency 1
        except BaseException:
            self.leave(req)
            raise
        return req

    def step(self) -> list[tuple[int, DecodeStep | RequestFailedError]]:
        """One target forward: draft, run the wave, verify it."""
        m = self.machine
        try:
            out = self._perform(m.inject(self.tick))
            self.tick += 1
            out += self._perform(m.collect(self.tick))
        except HomespecError as exc:  # this request's own fault (a cache refused its tree): it alone ends
            out = [a for req in list(m.runs) for a in self._perform(m.fail(req, exc.message, exc.hint))]
        return out

    def leave(self, req: int, stats: bool = False) -> None:
        self._perform(self.machine.leave(req))

    def _perform(self, actions: list[Action]) -> list[tuple[int, DecodeStep | RequestFailedError]]:
        out: list[tuple[int, DecodeStep | RequestFailedError]] = []
        for a in actions:
            if isinstance(a, SendWave):
                self.machine.deliver(self._wave(a))
            elif isinstance(a, SendPrefix):
                self.machine.deliver(self._prefix(a))
            elif isinstance(a, SendPrune):
                for cache in self.caches:
                    cache.commit(a.committed, a.dead)
            elif isinstance(a, Emit):
                out.append((a.request, a.step))
            elif isinstance(a, Fail):
                out.append((a.request, RequestFailedError(a.request, a.why, a.hint)))
        return out

    def _prefix(self, chunk: SendPrefix) -> StageResult:
        x: torch.Tensor = torch.tensor(list(chunk.tokens))
        positions = range(chunk.start, chunk.start + len(chunk.tokens))
        carry = None
        for stage, cache in zip(self.stages, self.caches, strict=True):
            x = stage.forward_prefix(cache, x, positions, carry)
            carry = stage.last_carry
        top_t: list[list[int]] = []
        top_lp: list[list[float]] = []
        if self.machine.runs[chunk.request].draft.learns:
            t, lp, _ = top_logprobs(x)
            top_t, top_lp = t.tolist(), lp.tolist()
        return StageResult(chunk.request, PREFIX_STEP, top_tokens=top_t, top_logprobs=top_lp, hidden=self._hidden())

    def _wave(self, wave: SendWave) -> StageResult:
        rows = wave.rows
        x: torch.Tensor = torch.tensor([r.token for r in rows])
        carry = None
        for i, (stage, cache) in enumerate(zip(self.stages, self.caches, strict=True)):
            started = time.perf_counter()
            x = stage.forward_tree(cache, rows, x, carry)
            carry = stage.last_carry
            self.busy[i] += time.perf_counter() - started
        picked = next_tokens(x, [r.position for r in rows], self._sampling)
        top_t, top_lp, chosen = top_logprobs(x, chosen=picked)
        return StageResult(
            wave.parts[0].request,
            wave.step,
            nodes=tuple(r.node for r in rows),
            next_tokens=tuple(picked),
            next_logprobs=tuple(chosen),
            top_tokens=top_t.tolist(),
            top_logprobs=top_lp.tolist(),
            hidden=self._hidden(),
            busy_s=tuple(self.busy),
        )

    def _hidden(self) -> torch.Tensor | None:
        """The features the request's draft reads: the last hidden states, or EAGLE-3's fc sum; None if none."""
        return self.stages[-1].features(self._taps) if self._features else None

    def _check_taps(self, taps: tuple[int, ...]) -> None:
        held = sorted(i for s in self.stages for i in s.taps)
        if held != sorted(taps):
            raise DraftError(
                f"this EAGLE-3 head reads layers {list(taps)}, the stages were loaded with taps at {held}",
                hint="start the engine with that head as its draft (--draft eagle:PATH), so its stages load its fc",
            )
