"""The decoding step, once, as a pure state machine (DESIGN §4): no sockets, no torch, no clock. Stdlib only.

Both decoders are thin executors of this machine: ``pipeline/inprocess.py`` runs the whole target here (mode
``ar``), ``pipeline/coordinator.py`` runs it across stage processes (``pp``, ``tree``, ``specpipe``). Everything
that decides (what to draft, what to send, when a result is due, what it verifies, what to prune, when a request
fails) lives here; the executors only move rows and results.

The machine runs in lockstep ticks. A wave sent at tick t is *due* at tick t + ``latency`` (the stage count of a
pipeline; 1 in process, where a wave's results are known before the next tick); a request's prompt chunks, sent when
it joins before tick j, are due at tick j + latency - 1, so that the draft has learned the prompt before the wave
that follows it is drafted. The executor's loop for tick t:

1. ``waiting(t)``: the requests whose due results have not been delivered yet. The executor reads results
   (``deliver``: buffered per request, whatever their order across requests) until none waits, and reports a
   request a stage failed (``fail``).
2. ``collect(t)``: for each request, in join order, apply its due results in the order they were sent (prompt
   chunks first: ``learn``, ``prefix_features``; then the wave: ``set_result``, ``learn``, ``tree_features``),
   verify, and emit. Actions: ``SendPrune`` (every stage drops the dead nodes and commits the accepted ones), ``Emit``.
3. ``inject(t)``: fail the requests whose context is full, split the step's node budget among the others, let each
   one's draft grow its tree, and choose the rows of the step's one wave. Actions: ``Fail``, ``EndRequest``,
   ``SendWave``. In ``specpipe`` a request whose tree still holds at least half a wave of drafted nodes (no flush)
   sends them without drafting first ...
4. ``draft()``: ... and drafts now, once the wave is on its way, while the stages compute (``STOCK_WAVES``).

Applying a result only when it is due (never when it happens to arrive) keeps the step counts and the drafts'
inputs deterministic for a given prompt, seed, mode, latency and batch: wall time changes, the tokens and the steps
do not.

What each mode injects (``draft_budget``, ``choose_wave``):

- ``pp``: only the root, and only when nothing is in flight: one token per S steps.
- ``tree``: the whole drafted tree, only when nothing is in flight: (accepted + 1) tokens per S steps. In process
  (latency 1) this is tree speculative decoding, mode ``ar``.
- ``specpipe``: every tick, with ``by_score`` (the default) the k best-scoring nodes whose parents were sent
  (FlowSpec order: after a flush the first wave carries a whole tree, later ones extend it), or the next depth
  layer of the tree (SpecPipe order, top-k by score): about one token per step when the true token is always there.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from homespec.core.tree import NodeId, NodeState, TokenTree, Verification, WaveRow
from homespec.errors import PeerLostError

PipelineMode = Literal["pp", "tree", "specpipe"]

#: specpipe defaults, measured (BENCHMARKS.md §2, S = 8, ngram+recycle, each run with a cold draft): score-ordered
#: waves of 32 nodes give 0.257 tokens per step, of 16 0.242, of 8 0.215; depth layers of 8 give 0.192. A row is nearly
#: free on a memory-bound device (a 3090 stage of Llama-70B stays memory-bound up to ~39 rows).
DEFAULT_WAVE_SIZE = 32
DEFAULT_BY_SCORE = True
#: specpipe drafts until its tree holds this many waves of unsent nodes: a score-ordered wave picks the best of them,
#: and after a verification prunes some, the rest can still fill the next wave while the draft refills it off the
#: critical path (``StepMachine.draft``). Measured (BENCHMARKS.md §2, S = 8, ``auto``): 2 waves gave 1096 steps, 3
#: 1078, 4 1075 (each more draft work); a stock under half a wave is drafted up first (after a flush it is empty).
STOCK_WAVES = 3
STOCK_MIN = 0.5
#: the most tree nodes a stage holds per request beside the committed prefix (``Assign.max_tree``)
DEFAULT_MAX_TREE = 512
#: a prompt goes through the stages in causal chunks of at most this many tokens
PREFIX_CHUNK = 256
#: the step number of prompt chunks (and of their results)
PREFIX_STEP = -1


@dataclass(frozen=True)
class TokenLogprob:
    """The target's log-probability of a committed token and its top alternatives, from the raw distribution
    (before temperature, top-k and top-p), as the last stage computed them (``homespec.events`` re-exports it)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token, log-prob), most probable first


class Draft(Protocol):
    """What the machine asks of a draft source (``model.drafts.base.DraftSource`` implements it)."""

    name: str
    learns: bool
    wants_features: bool
    feature_taps: tuple[int, ...]  # EAGLE-3: the features are the stages' fc sum over these layers

    def start(self, prompt: Sequence[int]) -> None: ...

    def propose(self, tree: TokenTree, committed: Sequence[int], budget: int) -> int: ...

    def observe(self, verification: Verification, committed: Sequence[int]) -> None: ...

    def learn(
        self, tokens: Sequence[int], top_tokens: Sequence[Sequence[int]], top_logprobs: Sequence[Sequence[float]]
    ) -> None: ...

    def prefix_features(self, start: int, hidden: Any) -> None: ...

    def tree_features(self, nodes: Sequence[int], hidden: Any) -> None: ...


def feature_request(draft: Draft) -> tuple[bool, bool]:
    """What a request's last stage returns with its results for ``draft``: (features at all, and whether they are
    EAGLE-3's fc sum over ``feature_taps`` rather than the last hidden states)."""
    return draft.wants_features, bool(draft.wants_features and draft.feature_taps)


@dataclass(frozen=True, slots=True)
class NodeRow:
    """One node of a traced tree (``TreeSnapshot``): where its wave is when the tree is verified."""

    node: int
    parent: int  # -1 for the root
    token: int
    state: Literal["drafted", "sent", "done"]  # NodeState's value
    stage: int  # the last stage its wave went through: -1 drafted (not sent), the last stage when its result is in


@dataclass(frozen=True)
class DecodeStep:
    """One verification of one request: what the engine turns into events."""

    verification: Verification
    wave_size: int  # nodes in the wave these results belong to
    tick: int  # ticks since the request joined (in process: target forwards)
    logprobs: tuple[TokenLogprob, ...] = ()  # one per emitted token
    stage_busy: tuple[float, ...] = ()  # per stage, its busy seconds so far (utilization over time)
    tree: tuple[NodeRow, ...] | None = None  # traced requests: the tree as this verification found it


# -- what the executor tells the machine ---------------------------------------------------------------------------
@dataclass(frozen=True)
class StageResult:
    """The last stage's answer for one request's rows of a wave, or for one of its prompt chunks (``step`` is
    ``PREFIX_STEP``; ``nodes``, ``next_tokens`` and ``next_logprobs`` are then empty, and the top-k rows are there
    only when the draft learns). ``hidden``: the last layer's hidden states [rows, hidden] when the draft wants
    features (opaque here: the executor checked its shape; the machine only indexes its rows)."""

    request: int
    step: int
    nodes: tuple[int, ...] = ()
    next_tokens: tuple[int, ...] = ()
    next_logprobs: tuple[float, ...] = ()
    top_tokens: Sequence[Sequence[int]] = ()
    top_logprobs: Sequence[Sequence[float]] = ()
    hidden: Any = None
    busy_s: tuple[float, ...] = ()  # every stage's busy seconds so far (() when unknown)


# -- what the machine tells the executor ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SendPrefix:
    """Send a prompt chunk (tokens at positions start .. start + len - 1) through the stages."""

    request: int
    start: int
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class WavePart:
    """One request's rows of a wave; the stages apply its prunes up to ``prune_seq`` before computing them."""

    request: int
    prune_seq: int
    rows: tuple[WaveRow, ...]


@dataclass(frozen=True)
class SendWave:
    """The step's one wave: every request's rows, each request's contiguous, in join order."""

    step: int
    parts: tuple[WavePart, ...]

    @property
    def rows(self) -> list[WaveRow]:
        return [r for part in self.parts for r in part.rows]


@dataclass(frozen=True)
class SendPrune:
    """Every stage commits ``committed`` nodes' KV to the request's prefix and drops ``dead`` ones."""

    request: int
    step: int
    seq: int
    committed: tuple[int, ...]
    dead: tuple[int, ...]


@dataclass(frozen=True)
class Emit:
    request: int
    step: DecodeStep


@dataclass(frozen=True)
class Fail:
    """The request ends with this error (it alone: the others go on)."""

    request: int
    why: str
    hint: str | None = None


@dataclass(frozen=True)
class EndRequest:
    """The request left: every stage frees its KV."""

    request: int


Action = SendPrefix | SendWave | SendPrune | Emit | Fail | EndRequest


# -- the decisions -----------------------------------------------------------------------------------------------
def draft_budget(mode: PipelineMode, tree: TokenTree, in_flight: int, wave_size: int, tree_budget: int) -> int:
    """How many draft nodes to add this tick."""
    if mode == "pp":
        return 0
    if mode == "tree":
        return tree_budget if in_flight == 0 else 0
    drafted = len(tree.in_state(NodeState.DRAFTED))
    return max(0, STOCK_WAVES * wave_size - drafted)


def choose_wave(mode: PipelineMode, tree: TokenTree, in_flight: int, wave_size: int, by_score: bool) -> list[NodeId]:
    """The nodes to inject this tick (possibly none: a bubble)."""
    if mode in ("pp", "tree"):
        if in_flight:
            return []
        if mode == "pp":
            return [tree.root.id] if tree.root.state is NodeState.DRAFTED else []
        return tree.ready()
    return tree.wave_by_score(wave_size) if by_score else tree.wave_by_depth(wave_size)


def split_budget(total: int, requests: int, tick: int = 0) -> list[int]:
    """Nodes per request for one step shared by ``requests`` requests (SpecPipe-DB): equal shares of ``total``,
    the remainder going to different requests on different ticks, and at least one node each (fairness: every
    active request advances every step, even when there are more requests than the budget)."""
    if requests <= 0:
        return []
    base, extra = divmod(total, requests)
    return [max(1, base + (1 if (i - tick) % requests < extra else 0)) for i in range(requests)]


def room_end(prompt_len: int, max_new: int | None, max_context: int) -> int:
    """The deepest position a draft node may be sent at (``TokenTree.max_position``): a request writes tokens up to
    position min(prompt_len + max_new, max_context) - 1, computed from nodes up to one before it."""
    end = max_context if max_new is None else min(max_context, prompt_len + max_new)
    return end - 2


_STATE_NAMES: dict[NodeState, Literal["drafted", "sent", "done"]] = {
    NodeState.DRAFTED: "drafted",
    NodeState.SENT: "sent",
    NodeState.DONE: "done",
}


def tree_rows(tree: TokenTree, stage_of: dict[int, int], done: int) -> tuple[NodeRow, ...]:
    """The tree before verification, for a TreeSnapshot: every node with its state and where its wave is."""
    return tuple(
        NodeRow(
            n.id,
            -1 if n.parent is None else n.parent,
            n.token,
            _STATE_NAMES[n.state],
            done if n.state is NodeState.DONE else stage_of.get(n.id, -1),
        )
        for n in tree
    )


def token_logprobs(
    tokens: Sequence[int], chosen_lp: Sequence[float], top_t: Sequence[Sequence[int]], top_lp: Sequence[Sequence[float]]
) -> list[TokenLogprob]:
    """Per row: the chosen token's log-prob and the top alternatives, as the engine reports them."""
    return [
        TokenLogprob(t, lp, tuple(zip(tt, tl, strict=True)))
        for t, lp, tt, tl in zip(tokens, chosen_lp, top_t, top_lp, strict=True)
    ]


@dataclass
class _Run:
    """One request's state: its tree, committed tokens, draft and what it has in flight."""

    request: int
    draft: Draft
    tree: TokenTree
    committed: list[int]
    tree_budget: int
    joined: int  # the tick it joined before
    trace: bool
    in_flight: deque[tuple[int, list[NodeId]]] = field(default_factory=deque)  # (tick sent, nodes)
    prefix: deque[tuple[int, tuple[int, ...]]] = field(default_factory=deque)  # chunks whose results are not applied
    inbox: deque[StageResult] = field(default_factory=deque)  # delivered, not applied yet (in the order sent)
    tokens: dict[int, int] = field(default_factory=dict)  # node -> token, for nodes in flight
    owed: int = 0  # its wave came from the drafted stock: the share to draft for, after the wave is sent
    logprobs: dict[int, TokenLogprob] = field(default_factory=dict)  # node -> the target's log-probs after it
    prune_seq: int = 0


class StepMachine:
    """Every active request's decoding state; see the module docstring for the tick."""

    def __init__(
        self,
        mode: PipelineMode,
        latency: int,
        stages: int | None = None,
        wave_size: int = DEFAULT_WAVE_SIZE,
        by_score: bool = DEFAULT_BY_SCORE,
        max_tree: int = DEFAULT_MAX_TREE,
        max_context: int = 4096,
        draft_behind: bool = True,
    ) -> None:
        """``latency``: ticks from sending a wave to verifying it; ``stages``: the stage count that traced trees
        report (default: ``latency``); ``draft_behind``: specpipe sends a wave from the drafted stock and drafts
        after it is sent (``draft``), off the critical path, whenever the stock holds half a wave."""
        if latency < 1 or wave_size < 1 or max_tree < 2:
            raise ValueError(f"latency {latency}, wave size {wave_size}, max tree {max_tree}: each must be positive")
        self.mode, self.latency, self.wave_size, self.by_score = mode, latency, wave_size, by_score
        self.draft_behind = draft_behind and mode == "specpipe"
        self.stages = latency if stages is None else stages
        self.max_tree, self.max_context = max_tree, max_context
        self.runs: dict[int, _Run] = {}  # in join order
        self.stage_busy: tuple[float, ...] = ()  # from the newest result that carried every stage's
        self.dropped = 0  # results of requests that had left, ignored

    # -- requests -------------------------------------------------------------------------------------------
    def join(
        self,
        request: int,
        prompt: Sequence[int],
        draft: Draft,
        tree_budget: int,
        tick: int,
        max_new: int | None = None,
        trace: bool = False,
    ) -> list[Action]:
        """Admit a request before ``tick``: its prompt (but the last token, the tree's root) goes into the stages.
        Nothing past ``max_new`` tokens (or the context) is ever drafted into a wave."""
        if not prompt:
            raise ValueError("empty prompt")
        if request in self.runs:
            raise ValueError(f"request {request} is already active")
        room = room_end(len(prompt), max_new, self.max_context)
        tree = TokenTree(prompt[-1], len(prompt) - 1, max_position=room)
        run = _Run(request, draft, tree, list(prompt), tree_budget, tick, trace)
        draft.start(prompt)
        self.runs[request] = run
        actions: list[Action] = []
        body = prompt[:-1]
        for a in range(0, len(body), PREFIX_CHUNK):
            chunk = tuple(body[a : a + PREFIX_CHUNK])
            run.prefix.append((a, chunk))
            actions.append(SendPrefix(request, a, chunk))
        return actions

    def leave(self, request: int) -> list[Action]:
        """The request ends (it has its tokens, or its client left): its results still on the way are dropped."""
        return [EndRequest(request)] if self.runs.pop(request, None) is not None else []

    def fail(self, request: int, why: str, hint: str | None = None) -> list[Action]:
        """A stage failed the request: it ends with ``why``."""
        if self.runs.pop(request, None) is None:
            return []
        return [EndRequest(request), Fail(request, why, hint)]

    # -- results --------------------------------------------------------------------------------------------
    def deliver(self, result: StageResult) -> None:
        """A result arrived; it is applied when it is due (``collect``)."""
        run = self.runs.get(result.request)
        if run is None:
            self.dropped += 1
            return
        rows = len(result.nodes)
        if result.step == PREFIX_STEP:
            if rows or result.next_tokens or result.next_logprobs:
                raise PeerLostError("a prompt chunk's result carries tree nodes")
        elif not (len(result.next_tokens) == len(result.next_logprobs) == len(result.top_tokens) == rows):
            raise PeerLostError(f"malformed result: {rows} nodes, {len(result.next_tokens)} tokens")
        run.inbox.append(result)

    def _due(self, run: _Run, tick: int) -> int:
        """How many results ``run`` must have applied by ``tick`` and has not yet."""
        prompt = len(run.prefix) if tick >= run.joined + self.latency - 1 else 0
        wave = 1 if run.in_flight and run.in_flight[0][0] <= tick - self.latency else 0
        return prompt + wave

    def waiting(self, tick: int) -> list[int]:
        """The requests whose results due at ``tick`` have not all been delivered."""
        return [r.request for r in self.runs.values() if len(r.inbox) < self._due(r, tick)]

    # -- the tick -------------------------------------------------------------------------------------------
    def collect(self, tick: int) -> list[Action]:
        """Apply every due result and verify: SendPrune and Emit actions. Every request must have its due
        results delivered (``waiting`` is empty)."""
        self.draft()  # what the tick before owes, if its executor did not draft after sending
        actions: list[Action] = []
        for run in list(self.runs.values()):
            if len(run.inbox) < self._due(run, tick):
                raise RuntimeError(f"request {run.request}: collect before its results were delivered")
            if tick >= run.joined + self.latency - 1:
                while run.prefix:
                    self._apply_prefix(run, run.inbox.popleft())
            if run.in_flight and run.in_flight[0][0] <= tick - self.latency:
                actions.extend(self._verify(run, tick))
        return actions

    def inject(self, tick: int) -> list[Action]:
        """Choose the step's wave (after ``collect``): Fail for requests whose context is full, then one SendWave if
        any request has rows to send. A request drafts first unless its wave can come from its stock of drafted
        nodes (``draft_behind``, the root not new): then it drafts in ``draft``, once the wave is on its way."""
        self.draft()  # what the tick before owes, if its executor did not draft after sending
        actions: list[Action] = []
        for run in list(self.runs.values()):
            if run.tree.root.position > (run.tree.max_position or 0) + 1:
                actions.extend(self.fail(run.request, f"the context of {self.max_context} tokens is full"))
        runs = list(self.runs.values())
        parts: list[WavePart] = []
        for run, share in zip(runs, split_budget(self.wave_size, len(runs), tick), strict=True):
            in_flight = len(run.in_flight)
            wave: list[NodeId] = []
            if self.draft_behind and run.tree.root.state is not NodeState.DRAFTED:
                wave = choose_wave(self.mode, run.tree, in_flight, share, self.by_score)
                if len(wave) < share * STOCK_MIN:
                    wave = []  # a thin stock (most of it pruned): draft first
            if not wave:
                budget = draft_budget(self.mode, run.tree, in_flight, share, min(run.tree_budget, self.max_tree - 1))
                if budget:
                    run.draft.propose(run.tree, run.committed, budget)
                wave = choose_wave(self.mode, run.tree, in_flight, share, self.by_score)
            else:
                run.owed = share
            if wave:
                run.tree.mark_sent(wave)
                rows = tuple(run.tree.rows(wave))
                run.tokens.update((r.node, r.token) for r in rows)
                run.in_flight.append((tick, wave))
                parts.append(WavePart(run.request, run.prune_seq, rows))
        if parts:
            actions.append(SendWave(tick, tuple(parts)))
        return actions

    def draft(self) -> None:
        """Refill the drafted stock of the requests whose wave came from it this tick: the executor calls this
        after sending the wave, so that drafting overlaps the stages' work (else ``collect`` calls it, before it
        applies a result). What is drafted does not depend on when this runs: the step counts stay deterministic."""
        for run in self.runs.values():
            if run.owed:
                budget = draft_budget(self.mode, run.tree, len(run.in_flight), run.owed, run.tree_budget)
                if budget:
                    run.draft.propose(run.tree, run.committed, budget)
                run.owed = 0

    def _apply_prefix(self, run: _Run, msg: StageResult) -> None:
        a, chunk = run.prefix.popleft()
        if msg.step != PREFIX_STEP:
            raise PeerLostError(f"pipeline out of order: result of step {msg.step} before the prompt's")
        draft = run.draft
        if draft.learns:
            if len(msg.top_tokens) != len(chunk):
                raise PeerLostError(f"prefix result has {len(msg.top_tokens)} rows for a chunk of {len(chunk)}")
            draft.learn(chunk, msg.top_tokens, msg.top_logprobs)
        if draft.wants_features:
            draft.prefix_features(a, _rows(msg.hidden, len(chunk)))

    def _verify(self, run: _Run, tick: int) -> list[Action]:
        sent_at, wave = run.in_flight.popleft()
        msg = run.inbox.popleft()
        if msg.step != sent_at:
            raise PeerLostError(f"pipeline out of order: result of step {msg.step}, expected {sent_at}")
        if len(msg.busy_s) == self.stages:
            self.stage_busy = msg.busy_s
        self._apply_wave(run, msg)
        snapshot = None
        if run.trace:
            stage_of = {int(n): tick - t - 1 for t, nodes in run.in_flight for n in nodes}  # the stage it left last
            snapshot = tree_rows(run.tree, stage_of, self.stages - 1)
        v = run.tree.verify()
        actions: list[Action] = []
        if v.committed or v.dead:
            run.prune_seq += 1
            actions.append(SendPrune(run.request, tick, run.prune_seq, v.committed, v.dead))
        run.committed.extend(v.emitted)
        run.draft.observe(v, run.committed)
        logprobs = tuple(run.logprobs.pop(n) for n in v.committed)
        for n in v.dead:
            run.logprobs.pop(n, None)
        actions.append(
            Emit(run.request, DecodeStep(v, len(wave), tick - run.joined, logprobs, self.stage_busy, snapshot))
        )
        return actions

    def _apply_wave(self, run: _Run, msg: StageResult) -> None:
        """Record a wave's results in the tree (nodes pruned while in flight are skipped: which of them a stage
        computed depends on timing) and tell the draft the target's top-k after each node still there."""
        tree, draft = run.tree, run.draft
        live = [
            i
            for i, (node, token) in enumerate(zip(msg.nodes, msg.next_tokens, strict=True))
            if tree.set_result(node, token)
        ]
        if live:
            nodes = [msg.nodes[i] for i in live]
            top_t = [msg.top_tokens[i] for i in live]
            top_lp = [msg.top_logprobs[i] for i in live]
            picked = [msg.next_tokens[i] for i in live]
            chosen = [msg.next_logprobs[i] for i in live]
            run.logprobs.update(zip(nodes, token_logprobs(picked, chosen, top_t, top_lp), strict=True))
            if draft.learns:
                draft.learn([run.tokens[n] for n in nodes], top_t, top_lp)
            if draft.wants_features:
                hidden = _rows(msg.hidden, len(msg.nodes))
                draft.tree_features(nodes, hidden if len(live) == len(msg.nodes) else hidden[live])
        for n in msg.nodes:
            run.tokens.pop(n, None)

    @property
    def open_requests(self) -> int:
        return len(self.runs)


def _rows(hidden: Any, rows: int) -> Any:
    """``hidden`` when it holds one row per result row (a draft that wants features needs them)."""
    if hidden is None or len(hidden) != rows:
        got = "none" if hidden is None else f"{len(hidden)} rows"
        raise PeerLostError(f"result carries hidden states ({got}) for {rows} rows")
    return hidden
