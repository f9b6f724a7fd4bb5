"""The head of a pipeline: performs ``core.schedule``'s decisions across stage processes (DESIGN §4.1, §4.2).

Lockstep ticks: at tick t the head collects the Result of the wave injected at tick t - S, verifies, broadcasts a
Prune (pruning propagation), lets the draft source expand the tree, and injects the next wave into stage 1. Step
counts are therefore deterministic for a given prompt, seed, mode, S and batch; wall time is whatever the stages take.

Several requests share the ticks (SpecPipe-DB): each has its own tree, draft source and KV on every stage, and each
tick injects one wave that holds every active request's rows, the step's node budget split among them
(``core.schedule.split_budget``), so every active request gets nodes every step and every stage runs the step as
one forward (projections and MLP over all rows, attention per request). Requests join (``join``: Start, prompt
chunks) and leave (``leave``: Abort, which frees their KV) between ticks. ``decode`` is the one-request form.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence

import torch

from homespec.config import SamplingConfig, TreeConfig
from homespec.core.messages import Abort, Prune, Result, Start, Wave
from homespec.core.schedule import (
    DEFAULT_BY_SCORE,
    DEFAULT_WAVE_SIZE,
    PipelineMode,
    choose_wave,
    draft_budget,
    split_budget,
)
from homespec.core.tree import NodeId, TokenTree, WaveRow
from homespec.errors import PeerLostError, RequestFailedError
from homespec.events import TokenLogprob
from homespec.model.drafts.base import DraftSource
from homespec.model.sampling import token_logprobs
from homespec.pipeline.cluster import Cluster
from homespec.pipeline.frames import from_raw, to_raw
from homespec.pipeline.inprocess import PREFIX_CHUNK, DecodeStep, room_end, tree_rows

RESULT_TIMEOUT_S = 30.0  # a hung (not dead) stage; a dead one is seen within 0.1 s
PREFIX_STEP = -1  # the step of prompt chunks (and of their results)


class _Run:
    """One request's state at the head: its tree, committed tokens, draft source and waves in flight."""

    def __init__(
        self, req: int, prompt: Sequence[int], draft: DraftSource, tree_cfg: TreeConfig, tick: int, max_position: int
    ) -> None:
        self.req, self.draft, self.tree_cfg, self.joined = req, draft, tree_cfg, tick
        self.max_position = max_position
        self.tree = TokenTree(prompt[-1], len(prompt) - 1, max_position=max_position)
        self.committed = list(prompt)
        self.in_flight: deque[tuple[int, list[NodeId]]] = deque()  # (tick sent, nodes)
        self.tokens: dict[int, int] = {}  # node -> token, for nodes in flight
        self.logprobs: dict[int, TokenLogprob] = {}  # node -> the target's log-probs of its next token
        self.prefix_chunks: deque[tuple[int, list[int]]] = deque()  # sent, results not yet read: (start, tokens)
        self.inbox: deque[Result] = deque()  # results read from the socket while collecting another request
        self.prune_seq = 0
        self.started = time.perf_counter()
        self.trace = False  # snapshot the tree at every verification (DecodeStep.tree)


class PipelineDecoder:
    def __init__(
        self,
        cluster: Cluster,
        mode: PipelineMode,
        wave_size: int = DEFAULT_WAVE_SIZE,
        by_score: bool = DEFAULT_BY_SCORE,
    ) -> None:
        self.cluster, self.mode, self.wave_size, self.by_score = cluster, mode, wave_size, by_score
        self.stages = cluster.size
        self.busy_fraction: list[float] = []  # per stage, for the last request that left
        self.runs: dict[int, _Run] = {}  # in join order
        self.stage_busy: tuple[float, ...] = ()  # every stage's busy seconds, from the newest Result
        self._stats_due: dict[int, float] = {}  # requests that left, whose stage stats are awaited -> their wall s

    @property
    def open_requests(self) -> int:
        return len(self.runs)

    def decode(
        self,
        prompt: Sequence[int],
        draft: DraftSource,
        sampling: SamplingConfig,
        tree_cfg: TreeConfig,
        trace: bool = False,
        max_new: int | None = None,
    ) -> Iterator[DecodeStep]:
        """One request alone: yield a DecodeStep each time one of its waves is verified, until the caller stops;
        RequestFailedError if a stage fails it."""
        req = self.join(prompt, draft, sampling, tree_cfg, trace, max_new)
        done = False
        try:
            while True:
                for r, step in self.step():
                    if r != req:
                        continue
                    if isinstance(step, RequestFailedError):
                        raise step
                    yield step
        except GeneratorExit:
            done = True  # the caller has all the tokens it wanted
            raise
        finally:
            self.leave(req, stats=done)

    def join(
        self,
        prompt: Sequence[int],
        draft: DraftSource,
        sampling: SamplingConfig,
        tree_cfg: TreeConfig,
        trace: bool = False,
        max_new: int | None = None,
    ) -> int:
        """Start a request on every stage and send its prompt; its first wave goes in at the next ``step``. Nothing
        past ``max_new`` tokens (or the stages' context) is ever drafted into a wave (``TokenTree.max_position``)."""
        c = self.cluster
        req = c.new_request_id()
        s = sampling
        c.broadcast(Start(req, s.temperature, s.top_p, s.top_k, s.seed, draft.wants_features, prompt_top=draft.learns))
        room = room_end(prompt, max_new, c.assigns[0].max_context)
        run = self.runs[req] = _Run(req, prompt, draft, tree_cfg, c.tick, room)
        run.trace = trace
        try:  # no handshake: a stage that sees the prompt before the Start waits for the Start (ids only grow)
            draft.start(prompt)
            self._prefill(run, prompt[:-1])
        except BaseException:
            self.leave(req)
            raise
        return req

    def leave(self, req: int, stats: bool = False) -> None:
        """End a request on every stage (its KV is freed); with ``stats``, the stages' busy fraction over its life
        becomes ``busy_fraction``: read now when it was alone, or as the stats arrive (at later steps) while other
        requests are decoding, so that they never wait for it."""
        run = self.runs.pop(req, None)
        if run is None:
            return
        self.cluster.broadcast(Abort(req, "finished"))
        if stats:
            self._stats_due[req] = time.perf_counter() - run.started
            while len(self._stats_due) > 64:  # stats that never came (a stage was replaced): give up on the oldest
                del self._stats_due[min(self._stats_due)]
            self._read_stats(wait_s=0.0 if self.runs else 2.0)

    def _read_stats(self, wait_s: float) -> None:
        for req, wall in list(self._stats_due.items()):
            got = self.cluster.collect_stats(req, wait_s)
            if len(got) == self.stages or wait_s > 0:
                del self._stats_due[req]
                if got:
                    self.busy_fraction = [min(1.0, s.busy_s / wall) for s in got]

    def step(self) -> list[tuple[int, DecodeStep | RequestFailedError]]:
        """One tick for every active request: collect and verify what is due, then inject the next waves. A request
        that a stage failed (or that filled the context) leaves with a RequestFailedError; the others go on."""
        tick = self.cluster.tick
        out: list[tuple[int, DecodeStep | RequestFailedError]] = []
        for run in list(self.runs.values()):
            try:
                self._check_failed(run)
                if run.in_flight and run.in_flight[0][0] <= tick - self.stages:
                    out.append((run.req, self._verify(run, tick)))
                if run.tree.root.position > run.max_position + 1:
                    raise RequestFailedError(run.req, f"the context of {self.cluster.assigns[0].max_context} is full")
            except RequestFailedError as exc:
                self.leave(run.req)
                out.append((run.req, exc))
        runs = list(self.runs.values())
        parts = []
        for run, share in zip(runs, split_budget(self.wave_size, len(runs), tick), strict=True):
            budget = draft_budget(self.mode, run.tree, len(run.in_flight), share, run.tree_cfg.budget)
            if budget:
                run.draft.propose(run.tree, run.committed, budget)
            wave = choose_wave(self.mode, run.tree, len(run.in_flight), share, self.by_score)
            if wave:
                parts.append(self._take(run, tick, wave))
        if parts:  # one wave for the step: every stage runs all requests' rows as one forward
            rows = [r for _, _, rs in parts for r in rs]
            data = to_raw(torch.tensor([r.token for r in rows], dtype=torch.int64))
            self.cluster.send_first(
                Wave(
                    tick,
                    False,
                    tuple(req for req, _, _ in parts),
                    tuple(len(rs) for _, _, rs in parts),
                    tuple(seq for _, seq, _ in parts),
                    tuple(r.node for r in rows),
                    tuple(r.parent for r in rows),
                    tuple(r.position for r in rows),
                    data,
                )
            )
        self.cluster.tick += 1
        if self._stats_due:
            self._read_stats(wait_s=0.0)
        return out

    def _verify(self, run: _Run, tick: int) -> DecodeStep:
        sent_at, wave = run.in_flight.popleft()
        self._collect(run, sent_at)
        snapshot = None
        if run.trace:
            stage_of = {n: tick - t - 1 for t, nodes in run.in_flight for n in nodes}  # the stage it left last
            snapshot = tree_rows(run.tree, stage_of, self.stages - 1)
        v = run.tree.verify()
        if v.committed or v.dead:
            run.prune_seq += 1
            self.cluster.broadcast(Prune(run.req, tick, run.prune_seq, v.committed, v.dead))
        run.committed.extend(v.emitted)
        run.draft.observe(v, run.committed)
        logprobs = tuple(run.logprobs.pop(n) for n in v.committed)
        for n in v.dead:
            run.logprobs.pop(n, None)
        return DecodeStep(v, len(wave), tick - run.joined, logprobs, self.stage_busy, snapshot)

    def _take(self, run: _Run, tick: int, wave: list[NodeId]) -> tuple[int, int, list[WaveRow]]:
        """Mark the run's chosen nodes sent: (request, prune seq, rows) for the step's wave."""
        tree = run.tree
        tree.mark_sent(wave)
        rows = tree.rows(wave)
        run.tokens.update((r.node, r.token) for r in rows)
        run.in_flight.append((tick, wave))
        return run.req, run.prune_seq, rows

    def _prefill(self, run: _Run, tokens: Sequence[int]) -> None:
        for a in range(0, len(tokens), PREFIX_CHUNK):
            chunk = list(tokens[a : a + PREFIX_CHUNK])
            data = to_raw(torch.tensor(chunk, dtype=torch.int64))
            positions = tuple(range(a, a + len(chunk)))
            self.cluster.send_first(Wave(PREFIX_STEP, True, (run.req,), (len(chunk),), (0,), (), (), positions, data))
            run.prefix_chunks.append((a, chunk))

    @staticmethod
    def _hidden(msg: Result, rows: int) -> torch.Tensor:
        hidden = from_raw(msg.hidden)
        if hidden.dim() != 2 or hidden.shape[0] != rows:
            raise PeerLostError(f"result carries hidden states {tuple(hidden.shape)} for {rows} rows")
        return hidden

    def _check_failed(self, run: _Run) -> None:
        why = self.cluster.failed.pop(run.req, None)
        if why is not None:
            raise RequestFailedError(run.req, why)

    def _next_result(self, run: _Run, deadline: float) -> Result:
        """The run's next Result; results of other active requests read on the way go to their inboxes, those of
        requests that left are dropped. RequestFailedError once a stage says it failed the run's request."""
        while not run.inbox:
            self._check_failed(run)
            msg = self.cluster.recv_result(deadline)
            if isinstance(msg, Result) and msg.request in self.runs:
                self.runs[msg.request].inbox.append(msg)
        return run.inbox.popleft()

    def _collect(self, run: _Run, sent_at: int) -> None:
        """Read the run's results until the one of the wave sent at ``sent_at``: record it in the tree, and tell
        the draft the target's top-k at every position (the prompt's chunks come first, in order)."""
        deadline = time.monotonic() + RESULT_TIMEOUT_S
        draft, tree = run.draft, run.tree
        while True:
            msg = self._next_result(run, deadline)
            top_t, top_lp = from_raw(msg.top_tokens), from_raw(msg.top_logprobs)
            if msg.step == PREFIX_STEP and run.prefix_chunks:
                a, chunk = run.prefix_chunks.popleft()
                if draft.learns:
                    if top_t.shape[0] != len(chunk):
                        raise PeerLostError(f"prefix result has {top_t.shape[0]} rows for a chunk of {len(chunk)}")
                    draft.learn(chunk, top_t.tolist(), top_lp.tolist())
                if draft.wants_features:
                    draft.prefix_features(a, self._hidden(msg, len(chunk)))
                continue
            break
        if len(msg.busy_s) == self.stages:
            self.stage_busy = msg.busy_s
        if msg.step != sent_at:
            raise PeerLostError(f"pipeline out of order: result of step {msg.step}, expected {sent_at}")
        if not (len(msg.nodes) == len(msg.next_tokens) == len(msg.next_logprobs) == top_t.shape[0]):
            raise PeerLostError(f"malformed result: {len(msg.nodes)} nodes, {len(msg.next_tokens)} tokens")
        live = [
            i
            for i, (node, token) in enumerate(zip(msg.nodes, msg.next_tokens, strict=True))
            if tree.set_result(node, token)
        ]
        if live:
            live_t, live_lp = top_t[live].tolist(), top_lp[live].tolist()
            nodes = [msg.nodes[i] for i in live]
            picked = [msg.next_tokens[i] for i in live]
            chosen = [msg.next_logprobs[i] for i in live]
            run.logprobs.update(zip(nodes, token_logprobs(picked, chosen, live_t, live_lp), strict=True))
        if live and draft.learns:  # only nodes still in the tree: which pruned ones a stage computed depends on timing
            draft.learn([run.tokens[msg.nodes[i]] for i in live], live_t, live_lp)
        if live and draft.wants_features:
            draft.tree_features([msg.nodes[i] for i in live], self._hidden(msg, len(msg.nodes))[live])
        for n in msg.nodes:
            run.tokens.pop(n, None)
