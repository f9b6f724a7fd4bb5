"""The head of a pipeline: an executor of ``core.step.StepMachine`` across stage processes (DESIGN §4.1, §4.2).

Lockstep ticks: at tick t the head reads results until every request has the ones due (the wave it injected at
tick t - S), the machine verifies them (the head broadcasts each Prune: pruning propagation) and chooses the next
wave, which the head injects into stage 1; then the drafts expand the trees (``StepMachine.draft``) while the stages
compute it (in ``specpipe`` a wave comes from the nodes drafted the tick before, unless a flush left too few). Step
counts are therefore deterministic for a given prompt, seed, mode, S and batch; wall time is whatever the stages take.

Several requests share the ticks (SpecPipe-DB): each has its own tree, draft source and KV on every stage, and each
tick injects one wave that holds every active request's rows, the step's node budget split among them, so every
stage runs the step as one forward (projections and MLP over all rows, attention per request). Requests join
(``join``: Start, prompt chunks) and leave (``leave``: Abort, which frees their KV) between ticks. ``decode`` is
the one-request form.

This module only moves messages: it turns the machine's actions into Start/Wave/Prune/Abort messages and the
stages' Results into ``StageResult``s, checking their tensors' shapes on the way.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Mapping, Sequence

import torch

from homespec.config import SamplingConfig, TreeConfig
from homespec.core.messages import Abort, Prune, Result, Start, Wave
from homespec.core.step import (
    DEFAULT_BY_SCORE,
    DEFAULT_WAVE_SIZE,
    PREFIX_STEP,
    Action,
    DecodeStep,
    Draft,
    Emit,
    EndRequest,
    Fail,
    PipelineMode,
    SendPrefix,
    SendPrune,
    SendWave,
    StageResult,
    StepMachine,
    feature_request,
)
from homespec.errors import PeerLostError, RequestFailedError
from homespec.pipeline.cluster import Cluster
from homespec.pipeline.frames import from_raw, to_raw
from homespec.pipeline.solo import decode_alone

RESULT_TIMEOUT_S = 30.0  # a hung (not dead) stage; a dead one is seen within 0.1 s


class PipelineDecoder:
    def __init__(
        self,
        cluster: Cluster,
        mode: PipelineMode,
        wave_size: int = DEFAULT_WAVE_SIZE,
        by_score: bool = DEFAULT_BY_SCORE,
    ) -> None:
        self.cluster, self.mode = cluster, mode
        self.stages = cluster.size
        first = cluster.assigns[0]
        self.machine = StepMachine(mode, cluster.size, None, wave_size, by_score, first.max_tree, first.max_context)
        self.busy_fraction: list[float] = []  # per stage, for the last request that left
        self._started: dict[int, float] = {}  # active request -> when it joined (for its busy fraction)
        self._stats_due: dict[int, float] = {}  # requests that left, whose stage stats are awaited -> their wall s

    @property
    def open_requests(self) -> int:
        return self.machine.open_requests

    @property
    def runs(self) -> Mapping[int, object]:
        """The active requests (by id), in join order."""
        return self.machine.runs

    def decode(
        self,
        prompt: Sequence[int],
        draft: Draft,
        sampling: SamplingConfig,
        tree_cfg: TreeConfig,
        trace: bool = False,
        max_new: int | None = None,
    ) -> Generator[DecodeStep, None, None]:
        """One request alone: yield a DecodeStep each time one of its waves is verified, until the caller stops;
        RequestFailedError if a stage fails it."""
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
        """Start a request on every stage and send its prompt; its first wave goes in at the next ``step``. Nothing
        past ``max_new`` tokens (or the stages' context) is ever drafted into a wave (``TokenTree.max_position``)."""
        c, s = self.cluster, sampling
        req = c.new_request_id()
        features, taps = feature_request(draft)
        c.broadcast(
            Start(req, s.temperature, s.top_p, s.top_k, s.seed, features=features, prompt_top=draft.learns, taps=taps)
        )
        self._started[req] = time.perf_counter()
        try:  # no handshake: a stage that sees the prompt before the Start waits for the Start (ids only grow)
            self._perform(self.machine.join(req, prompt, draft, tree_cfg.budget, c.tick, max_new, trace))
        except BaseException:
            self.leave(req)
            raise
        return req

    def leave(self, req: int, stats: bool = False) -> None:
        """End a request on every stage (its KV is freed); with ``stats``, the stages' busy fraction over its life
        becomes ``busy_fraction``: read now when it was alone, or as the stats arrive (at later steps) while other
        requests are decoding, so that they never wait for it."""
        started = self._started.pop(req, None)
        self._perform(self.machine.leave(req))
        if stats and started is not None:
            self._stats_due[req] = time.perf_counter() - started
            while len(self._stats_due) > 64:  # stats that never came (a stage was replaced): give up on the oldest
                del self._stats_due[min(self._stats_due)]
            self._read_stats(wait_s=0.0 if self.machine.runs else 2.0)

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
        m = self.machine
        out: list[tuple[int, DecodeStep | RequestFailedError]] = []
        deadline = time.monotonic() + RESULT_TIMEOUT_S
        out.extend(self._perform(self._failures()))
        while m.waiting(tick):
            msg = self.cluster.recv_result(deadline)
            if isinstance(msg, Result):
                m.deliver(self._result(msg))
            out.extend(self._perform(self._failures()))
        out.extend(self._perform([*m.collect(tick), *m.inject(tick)]))
        m.draft()  # the wave is on its way: drafting overlaps the stages' work
        self.cluster.tick += 1
        if self._stats_due:
            self._read_stats(wait_s=0.0)
        return out

    def _failures(self) -> list[Action]:
        """The machine told of every active request a stage failed."""
        failed = self.cluster.failed
        return [a for req in list(self.machine.runs) if req in failed for a in self.machine.fail(req, failed.pop(req))]

    def _perform(self, actions: list[Action]) -> list[tuple[int, DecodeStep | RequestFailedError]]:
        out: list[tuple[int, DecodeStep | RequestFailedError]] = []
        c = self.cluster
        for a in actions:
            if isinstance(a, Emit):
                out.append((a.request, a.step))
            elif isinstance(a, SendWave):
                rows = a.rows
                c.send_first(
                    Wave(
                        step=a.step,
                        prefix=False,
                        requests=tuple(p.request for p in a.parts),
                        counts=tuple(len(p.rows) for p in a.parts),
                        prune_seqs=tuple(p.prune_seq for p in a.parts),
                        nodes=tuple(r.node for r in rows),
                        parents=tuple(r.parent for r in rows),
                        positions=tuple(r.position for r in rows),
                        data=to_raw(torch.tensor([r.token for r in rows], dtype=torch.int64)),
                    )
                )
            elif isinstance(a, SendPrune):
                c.broadcast(Prune(a.request, a.step, a.seq, a.committed, a.dead))
            elif isinstance(a, SendPrefix):
                c.send_first(
                    Wave(
                        step=PREFIX_STEP,
                        prefix=True,
                        requests=(a.request,),
                        counts=(len(a.tokens),),
                        prune_seqs=(0,),
                        nodes=(),
                        parents=(),
                        positions=tuple(range(a.start, a.start + len(a.tokens))),
                        data=to_raw(torch.tensor(a.tokens, dtype=torch.int64)),
                    )
                )
            elif isinstance(a, EndRequest):
                self._started.pop(a.request, None)
                c.broadcast(Abort(a.request, "finished"))
            elif isinstance(a, Fail):
                out.append((a.request, RequestFailedError(a.request, a.why, a.hint)))
        return out

    def _result(self, msg: Result) -> StageResult:
        """A stage's Result as the machine reads it, its tensors checked against its row count."""
        top_t, top_lp = from_raw(msg.top_tokens), from_raw(msg.top_logprobs)
        if top_t.shape != top_lp.shape or (msg.step != PREFIX_STEP and top_t.shape[0] != len(msg.nodes)):
            raise PeerLostError(f"malformed result: {len(msg.nodes)} nodes, top-k {tuple(top_t.shape)}")
        hidden: torch.Tensor | None = from_raw(msg.hidden)
        if hidden is None or not hidden.numel():
            hidden = None  # the request's draft wants no features
        elif hidden.dim() != 2:
            raise PeerLostError(f"result carries hidden states of shape {tuple(hidden.shape)}")
        return StageResult(
            request=msg.request,
            step=msg.step,
            nodes=msg.nodes,
            next_tokens=msg.next_tokens,
            next_logprobs=msg.next_logprobs,
            top_tokens=top_t.tolist(),
            top_logprobs=top_lp.tolist(),
            hidden=hidden,
            busy_s=msg.busy_s,
        )
