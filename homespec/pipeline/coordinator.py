"""The head of a pipeline: performs ``core.schedule``'s decisions across stage processes (DESIGN §4.1).

Lockstep ticks: at tick t the head collects the Result of the wave injected at tick t - S, verifies, broadcasts a
Prune (pruning propagation), lets the draft source expand the tree, and injects the next wave into stage 1. Step
counts are therefore deterministic for a given prompt, seed, mode and S; wall time is whatever the stages take.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterator, Sequence

import torch

from homespec.config import SamplingConfig, TreeConfig
from homespec.core.messages import Abort, Prune, Result, Start, Wave
from homespec.core.schedule import DEFAULT_BY_SCORE, DEFAULT_WAVE_SIZE, PipelineMode, choose_wave, draft_budget
from homespec.core.tree import NodeId, TokenTree
from homespec.errors import PeerLostError
from homespec.model.drafts.base import DraftSource
from homespec.pipeline.cluster import LocalCluster
from homespec.pipeline.frames import from_raw, to_raw
from homespec.pipeline.inprocess import PREFIX_CHUNK, DecodeStep

RESULT_TIMEOUT_S = 30.0  # a hung (not dead) stage; a dead one is seen within 0.1 s
PREFIX_STEP = -1  # the step of prompt chunks (and of their results)


class PipelineDecoder:
    def __init__(
        self,
        cluster: LocalCluster,
        mode: PipelineMode,
        wave_size: int = DEFAULT_WAVE_SIZE,
        by_score: bool = DEFAULT_BY_SCORE,
    ) -> None:
        self.cluster, self.mode, self.wave_size, self.by_score = cluster, mode, wave_size, by_score
        self.stages = cluster.size
        self.busy_fraction: list[float] = []  # per stage, for the last finished request

    def decode(
        self, prompt: Sequence[int], draft: DraftSource, sampling: SamplingConfig, tree_cfg: TreeConfig
    ) -> Iterator[DecodeStep]:
        """Yield a DecodeStep each time a wave's results are verified; the caller stops when it has enough."""
        req = self.cluster.new_request_id()
        c = self.cluster
        features = draft.wants_features
        s = sampling
        c.broadcast(Start(req, s.temperature, s.top_p, s.top_k, s.seed, features, prompt_top=draft.learns))
        started = time.perf_counter()
        ok = False
        try:
            c.sync(seq=req, deadline=time.monotonic() + RESULT_TIMEOUT_S)
            self._prefill(req, prompt[:-1])
            yield from self._ticks(req, prompt, draft, tree_cfg)
        except GeneratorExit:
            ok = True  # the caller has all the tokens it wanted
            raise
        finally:
            c.broadcast(Abort(req, "finished"))
            if ok:
                wall = time.perf_counter() - started
                self.busy_fraction = [min(1.0, s.busy_s / wall) for s in c.collect_stats(req)]

    def _prefill(self, req: int, tokens: Sequence[int]) -> None:
        self._prefix_chunks: deque[tuple[int, list[int]]] = deque()  # sent, results not yet read: (start, tokens)
        for a in range(0, len(tokens), PREFIX_CHUNK):
            chunk = list(tokens[a : a + PREFIX_CHUNK])
            data = to_raw(torch.tensor(chunk, dtype=torch.int64))
            positions = tuple(range(a, a + len(chunk)))
            self.cluster.send_first(Wave(req, PREFIX_STEP, True, 0, (), (), positions, data))
            self._prefix_chunks.append((a, chunk))

    def _ticks(self, req: int, prompt: Sequence[int], draft: DraftSource, tree_cfg: TreeConfig) -> Iterator[DecodeStep]:
        tree = TokenTree(prompt[-1], len(prompt) - 1)
        committed = list(prompt)
        draft.start(prompt)
        in_flight: deque[tuple[int, list[NodeId]]] = deque()
        tokens: dict[int, int] = {}  # node -> token, for nodes in flight
        prune_seq = 0
        for tick in itertools.count():
            if in_flight and in_flight[0][0] <= tick - self.stages:
                sent_at, wave = in_flight.popleft()
                self._collect(req, sent_at, tree, tokens, draft)
                v = tree.verify()
                if v.committed or v.dead:
                    prune_seq += 1
                    self.cluster.broadcast(Prune(req, tick, prune_seq, v.committed, v.dead))
                committed.extend(v.emitted)
                draft.observe(v, committed)
                yield DecodeStep(v, len(wave), tick)
            budget = draft_budget(self.mode, tree, len(in_flight), self.wave_size, tree_cfg.budget)
            if budget:
                draft.propose(tree, committed, budget)
            wave = choose_wave(self.mode, tree, len(in_flight), self.wave_size, self.by_score)
            if wave:
                tree.mark_sent(wave)
                rows = tree.rows(wave)
                tokens.update((r.node, r.token) for r in rows)
                data = to_raw(torch.tensor([r.token for r in rows], dtype=torch.int64))
                parents = tuple(r.parent for r in rows)
                positions = tuple(r.position for r in rows)
                self.cluster.send_first(Wave(req, tick, False, prune_seq, tuple(wave), parents, positions, data))
                in_flight.append((tick, wave))

    @staticmethod
    def _hidden(msg: Result, rows: int) -> torch.Tensor:
        hidden = from_raw(msg.hidden)
        if hidden.dim() != 2 or hidden.shape[0] != rows:
            raise PeerLostError(f"result carries hidden states {tuple(hidden.shape)} for {rows} rows")
        return hidden

    def _collect(self, req: int, sent_at: int, tree: TokenTree, tokens: dict[int, int], draft: DraftSource) -> None:
        """Read results until the one of the wave sent at ``sent_at``: record it in the tree, and tell the draft
        the target's top-k at every position (the prompt's chunks come first, in order)."""
        deadline = time.monotonic() + RESULT_TIMEOUT_S
        while True:
            msg = self.cluster.recv_result(deadline)
            if not isinstance(msg, Result) or msg.request != req:
                continue  # results of an earlier, abandoned request are skipped
            top_t, top_lp = from_raw(msg.top_tokens), from_raw(msg.top_logprobs)
            if msg.step == PREFIX_STEP and self._prefix_chunks:
                a, chunk = self._prefix_chunks.popleft()
                if draft.learns:
                    if top_t.shape[0] != len(chunk):
                        raise PeerLostError(f"prefix result has {top_t.shape[0]} rows for a chunk of {len(chunk)}")
                    draft.learn(chunk, top_t.tolist(), top_lp.tolist())
                if draft.wants_features:
                    draft.prefix_features(a, self._hidden(msg, len(chunk)))
                continue
            break
        if msg.step != sent_at:
            raise PeerLostError(f"pipeline out of order: result of step {msg.step}, expected {sent_at}")
        if not (len(msg.nodes) == len(msg.next_tokens) == top_t.shape[0]):
            raise PeerLostError(f"malformed result: {len(msg.nodes)} nodes, {len(msg.next_tokens)} tokens")
        live = [
            i
            for i, (node, token) in enumerate(zip(msg.nodes, msg.next_tokens, strict=True))
            if tree.set_result(node, token)
        ]
        if live and draft.learns:  # only nodes still in the tree: which pruned ones a stage computed depends on timing
            draft.learn([tokens[msg.nodes[i]] for i in live], top_t[live].tolist(), top_lp[live].tolist())
        if live and draft.wants_features:
            draft.tree_features([msg.nodes[i] for i in live], self._hidden(msg, len(msg.nodes))[live])
        for n in msg.nodes:
            tokens.pop(n, None)
