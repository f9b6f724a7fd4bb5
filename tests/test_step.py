"""The decoding step's state machine (core/step.py) replayed with literal event sequences and a fake target: no
processes, no torch, milliseconds per case. The real-process lossless matrix (test_pipeline, test_equivalence)
stays the end-to-end proof; these pin the decisions: when a result is due, what late, foreign, pruned or
orphaned results do, how a request fails alone, and that delivery order never changes tokens or step counts."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from homespec.core.step import (
    PREFIX_CHUNK,
    PREFIX_STEP,
    STOCK_WAVES,
    Action,
    Emit,
    EndRequest,
    Fail,
    PipelineMode,
    SendPrefix,
    SendPrune,
    SendWave,
    StageResult,
    StepMachine,
)
from homespec.core.tree import NodeState, TokenTree, Verification
from homespec.errors import PeerLostError

VOCAB = 50


def target(position: int, token: int) -> int:
    """The fake target's greedy next token after ``token`` at ``position`` (a Markov chain over the vocabulary)."""
    return (token * 31 + position * 7 + 3) % VOCAB


def greedy(prompt: Sequence[int], n: int) -> list[int]:
    out, tok, pos = [], prompt[-1], len(prompt) - 1
    for _ in range(n):
        tok = target(pos, tok)
        pos += 1
        out.append(tok)
    return out


class Rows:
    """Hidden states as the machine sees them: something with a length whose rows can be picked by a list."""

    def __init__(self, ids: Sequence[int]) -> None:
        self.ids = list(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, picked: list[int]) -> Rows:
        return Rows([self.ids[i] for i in picked])


@dataclass
class FakeDraft:
    """Drafts up to ``depth`` levels below the frontier: the target's token where ``hits(position)``, a wrong one
    otherwise, and a wrong sibling beside each; records every call the machine makes."""

    hits: Any = lambda position: position % 3 != 0
    depth: int = 3
    learns: bool = True
    wants_features: bool = False
    feature_taps: tuple[int, ...] = ()
    name: str = "fake"
    learned: list[int] = field(default_factory=list)  # tokens the target's top-k was told after
    prefix_seen: list[tuple[int, int]] = field(default_factory=list)  # (start, rows) of prompt features
    features: list[list[int]] = field(default_factory=list)  # node ids of tree features, per call
    proposals: int = 0
    observed: list[Verification] = field(default_factory=list)
    learned_before_first_proposal: int | None = None

    def start(self, prompt: Sequence[int]) -> None:
        self.learned, self.proposals = [], 0

    def propose(self, tree: TokenTree, committed: Sequence[int], budget: int) -> int:
        if self.learned_before_first_proposal is None:
            self.learned_before_first_proposal = len(self.learned)
        self.proposals += 1
        added = 0
        frontier = deque((n.id, 0) for n in tree if not n.children)
        while frontier and added < budget:
            nid, d = frontier.popleft()
            if d >= self.depth:
                continue
            node = tree.node(nid)
            right = target(node.position, node.token)
            guess = right if self.hits(node.position) else (right + 1) % VOCAB
            for token, logp in ((guess, -0.1), ((guess + 7) % VOCAB, -2.0)):
                if added >= budget:
                    break
                child, created = tree.add(nid, token, logp, self.name)
                added += created
                frontier.append((child, d + 1))
        return added

    def observe(self, verification: Verification, committed: Sequence[int]) -> None:
        self.observed.append(verification)

    def learn(self, tokens: Sequence[int], top_tokens: Any, top_logprobs: Any) -> None:
        assert len(tokens) == len(top_tokens) == len(top_logprobs)
        self.learned.extend(tokens)

    def prefix_features(self, start: int, hidden: Any) -> None:
        self.prefix_seen.append((start, len(hidden)))

    def tree_features(self, nodes: Sequence[int], hidden: Any) -> None:
        assert list(nodes) == hidden.ids  # the rows of exactly these nodes
        self.features.append(list(nodes))


class FakeStages:
    """The stages and the last stage's results, as an executor sees them: waves are remembered with the tick they
    were sent; each stage's view of a request's tree (sent, committed, dead nodes) is checked against the prunes."""

    def __init__(self) -> None:
        self.pending: dict[int, deque[StageResult]] = {}  # request -> results not yet delivered, in send order
        self.sent: dict[int, set[int]] = {}
        self.dead: dict[int, set[int]] = {}
        self.ended: list[int] = []
        self.emitted: dict[int, list[int]] = {}
        self.steps: dict[int, list[tuple[int, int]]] = {}  # request -> (tick, tokens emitted) per verification
        self.failed: dict[int, str] = {}
        self.deepest: dict[int, int] = {}  # request -> the deepest position a wave carried

    def perform(self, actions: list[Action], features: bool = False) -> None:
        for a in actions:
            if isinstance(a, SendPrefix):
                rows = len(a.tokens)
                self.pending.setdefault(a.request, deque()).append(
                    StageResult(
                        a.request,
                        PREFIX_STEP,
                        top_tokens=[[target(a.start + i, t)] for i, t in enumerate(a.tokens)],
                        top_logprobs=[[-0.1]] * rows,
                        hidden=Rows(range(rows)) if features else None,
                    )
                )
            elif isinstance(a, SendWave):
                for part in a.parts:
                    sent = self.sent.setdefault(part.request, set())
                    for r in part.rows:
                        assert r.node not in sent, f"node {r.node} sent twice"
                        assert r.node not in self.dead.get(part.request, set()), f"dead node {r.node} sent"
                        assert r.parent == -1 or r.parent in sent, f"node {r.node} before its parent"
                        sent.add(r.node)
                        self.deepest[part.request] = max(self.deepest.get(part.request, 0), r.position)
                    self.pending.setdefault(part.request, deque()).append(
                        StageResult(
                            part.request,
                            a.step,
                            nodes=tuple(r.node for r in part.rows),
                            next_tokens=tuple(target(r.position, r.token) for r in part.rows),
                            next_logprobs=(-0.1,) * len(part.rows),
                            top_tokens=[[target(r.position, r.token)] for r in part.rows],
                            top_logprobs=[[-0.1]] * len(part.rows),
                            hidden=Rows([r.node for r in part.rows]) if features else None,
                            busy_s=(1.0,),
                        )
                    )
            elif isinstance(a, SendPrune):
                sent = self.sent[a.request]
                assert set(a.committed) <= sent, "committed a node no stage computed"
                self.dead.setdefault(a.request, set()).update(a.dead)
            elif isinstance(a, Emit):
                self.emitted.setdefault(a.request, []).extend(a.step.verification.emitted)
                self.steps.setdefault(a.request, []).append((a.step.tick, len(a.step.verification.emitted)))
            elif isinstance(a, EndRequest):
                self.ended.append(a.request)
            elif isinstance(a, Fail):
                self.failed[a.request] = a.why

    def deliver_all(self, machine: StepMachine, rng: random.Random | None = None) -> None:
        """Every result computed so far, interleaving requests (each request's own in send order)."""
        while any(self.pending.values()):
            reqs = [r for r, q in self.pending.items() if q]
            req = rng.choice(reqs) if rng else reqs[0]
            machine.deliver(self.pending[req].popleft())


def run_lockstep(
    mode: PipelineMode,
    latency: int,
    prompts: list[list[int]],
    max_new: int,
    wave_size: int = 8,
    rng: random.Random | None = None,
    early: bool = False,
    hits: Any = None,
    draft_after: bool = False,
) -> FakeStages:
    """Every request joins before tick 0 and runs until it has ``max_new`` tokens. Results are delivered when the
    machine waits for them, or (``early``) as soon as they exist, in an order ``rng`` shuffles across requests;
    with ``draft_after`` the executor calls ``draft`` after each tick's wave, as the pipeline's does."""
    m = StepMachine(mode, latency, wave_size=wave_size, max_context=4096)
    stages = FakeStages()
    drafts = {}
    for i, prompt in enumerate(prompts, start=1):
        drafts[i] = FakeDraft(hits=hits) if hits else FakeDraft()
        stages.perform(m.join(i, prompt, drafts[i], tree_budget=12, tick=0, max_new=max_new))
    for tick in range(2000):
        if not m.runs:
            break
        if early:
            stages.deliver_all(m, rng)
        while m.waiting(tick):
            stages.deliver_all(m, rng)
        stages.perform(m.collect(tick))
        for req in list(m.runs):
            if len(stages.emitted.get(req, [])) >= max_new:
                stages.perform(m.leave(req))
        stages.perform(m.inject(tick))
        if draft_after:
            m.draft()
    assert not m.runs, "the requests did not finish"
    return stages


PROMPTS = [[1, 2, 3, 4, 5], [7, 7], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12]]


@settings(max_examples=60, deadline=None)
@given(
    mode=st.sampled_from(["pp", "tree", "specpipe"]),
    latency=st.integers(1, 8),
    requests=st.integers(1, 3),
    wave_size=st.integers(1, 16),
    max_new=st.integers(1, 40),
    seed=st.integers(0, 1 << 16),
    miss_every=st.integers(2, 6),
)
def test_every_request_gets_the_targets_tokens_whatever_the_delivery_order(
    mode: PipelineMode, latency: int, requests: int, wave_size: int, max_new: int, seed: int, miss_every: int
) -> None:
    """Lossless, and deterministic: the same tokens and the same steps when results arrive in another order across
    requests, or earlier than they are due, and whether the executor drafts after sending a wave or not."""

    def hits(p: int) -> bool:
        return p % miss_every != 0

    prompts = PROMPTS[:requests]
    a = run_lockstep(mode, latency, prompts, max_new, wave_size, hits=hits)
    b = run_lockstep(mode, latency, prompts, max_new, wave_size, random.Random(seed), True, hits, draft_after=True)
    for req, prompt in enumerate(prompts, start=1):
        assert a.emitted[req][:max_new] == greedy(prompt, max_new)
    assert a.emitted == b.emitted and a.steps == b.steps


def test_specpipe_sends_from_its_stock_and_drafts_after_the_wave_is_sent() -> None:
    """A wave that the drafted stock fills goes out without a proposal; ``draft`` then refills the stock (to
    ``STOCK_WAVES`` waves). After a flush the stock is empty: the draft proposes before the wave."""
    m = StepMachine("specpipe", latency=3, wave_size=4)
    stages, draft = FakeStages(), FakeDraft(hits=lambda p: p != 4, depth=8)
    stages.perform(m.join(1, [5, 6], draft, 12, tick=0))
    stages.deliver_all(m)
    stages.perform([*m.collect(0), *m.inject(0)])  # a new root: drafted first
    assert draft.proposals == 1
    tree = m.runs[1].tree
    stages.perform(m.inject(1))  # the stock (12 drafted, 4 sent) fills the wave: no proposal before it is sent
    assert draft.proposals == 1 and len(m.runs[1].in_flight) == 2
    m.draft()
    assert draft.proposals == 2 and len(tree.in_state(NodeState.DRAFTED)) == STOCK_WAVES * 4
    m.draft()  # nothing owed
    assert draft.proposals == 2
    flushed = False
    for tick in range(2, 12):
        stages.deliver_all(m)
        stages.perform(m.collect(tick))
        before = draft.proposals
        new_root = m.runs[1].tree.root.state is NodeState.DRAFTED
        stages.perform(m.inject(tick))
        if new_root:  # the flush at position 4 (the draft's miss): drafted before the wave
            flushed = True
            assert draft.proposals == before + 1
        m.draft()
    assert flushed
    assert stages.emitted[1] == greedy([5, 6], len(stages.emitted[1]))


def test_pp_gives_one_token_per_latency_ticks() -> None:
    stages = run_lockstep("pp", 4, [PROMPTS[0]], 5)
    assert stages.steps[1] == [(4, 1), (8, 1), (12, 1), (16, 1), (20, 1)]


def test_a_late_result_holds_the_tick_until_it_is_delivered() -> None:
    m = StepMachine("specpipe", latency=2, wave_size=4)
    stages = FakeStages()
    stages.perform(m.join(1, [3, 4], FakeDraft(), 12, tick=0))
    stages.deliver_all(m)  # the prompt chunk
    assert m.waiting(0) == []
    stages.perform([*m.collect(0), *m.inject(0)])
    assert m.waiting(1) == []  # the wave of tick 0 is due at tick 2
    stages.perform([*m.collect(1), *m.inject(1)])
    assert m.waiting(2) == [1]
    with pytest.raises(RuntimeError, match="before its results were delivered"):
        m.collect(2)
    m.deliver(stages.pending[1].popleft())
    assert m.waiting(2) == []
    actions = m.collect(2)
    assert [type(a) for a in actions] in ([SendPrune, Emit], [Emit])
    assert stages.steps == {}
    stages.perform(actions)
    assert stages.steps[1][0][0] == 2


def test_the_prompt_is_learned_before_the_first_wave_that_can_use_it() -> None:
    """Prompt chunks are due at the tick before the first wave's result: the draft learns the prompt's top-k
    before it drafts at that tick (in process, latency 1: before its very first proposal)."""
    prompt = list(range(PREFIX_CHUNK + 40))
    for latency in (1, 3):
        m = StepMachine("specpipe", latency=latency, wave_size=4)
        stages, draft = FakeStages(), FakeDraft()
        actions = m.join(1, prompt, draft, 12, tick=5)
        assert [(a.start, len(a.tokens)) for a in actions if isinstance(a, SendPrefix)] == [
            (0, PREFIX_CHUNK),
            (PREFIX_CHUNK, len(prompt) - 1 - PREFIX_CHUNK),
        ]
        stages.perform(actions)
        for tick in range(5, 5 + latency - 1):
            assert m.waiting(tick) == []
            stages.perform([*m.collect(tick), *m.inject(tick)])
            assert draft.learned == []
        due = 5 + latency - 1
        assert m.waiting(due) == [1]
        stages.deliver_all(m)  # both chunks and whatever waves were sent: only what is due is applied
        stages.perform([*m.collect(due), *m.inject(due)])
        assert draft.learned[: len(prompt) - 1] == prompt[:-1]
        assert draft.learned_before_first_proposal == (len(prompt) - 1 if latency == 1 else 0)


def test_results_pruned_in_flight_are_ignored_and_never_taught_to_the_draft() -> None:
    """specpipe, latency 3, a draft wrong at the first position: the first verification flushes the tree while the
    next two waves (grandchildren of the wrong guesses) are in flight; their results arrive for dead nodes."""
    m = StepMachine("specpipe", latency=3, wave_size=2)
    stages = FakeStages()
    draft = FakeDraft(hits=lambda p: p != 1, depth=6)
    stages.perform(m.join(1, [5, 6], draft, 12, tick=0))
    for tick in range(3):
        stages.deliver_all(m)
        stages.perform([*m.collect(tick), *m.inject(tick)])
    stages.deliver_all(m)
    stages.perform(m.collect(3))
    dead = stages.dead[1]
    assert dead, "the flush pruned nothing"
    in_flight = {n for _, nodes in m.runs[1].in_flight for n in nodes}
    assert in_flight & dead, "no pruned node was in flight"
    next_due = set(m.runs[1].in_flight[0][1])  # sent at tick 1, all dead: its results come at tick 4
    assert next_due <= dead
    learned_before = len(draft.learned)
    stages.perform(m.inject(3))
    stages.perform([*m.collect(4), *m.inject(4)])
    tree = m.runs[1].tree
    assert not any(n.id in dead for n in tree)
    assert not (set(m.runs[1].logprobs) & dead) and not (set(m.runs[1].tokens) & next_due)
    assert len(draft.learned) == learned_before  # nothing of a dead node was taught


def test_results_of_a_request_that_left_are_dropped_and_the_others_go_on() -> None:
    m = StepMachine("specpipe", latency=2, wave_size=4)
    stages = FakeStages()
    stages.perform(m.join(1, PROMPTS[0], FakeDraft(), 12, tick=0))
    stages.perform(m.join(2, PROMPTS[1], FakeDraft(), 12, tick=0))
    stages.deliver_all(m)
    for tick in range(2):
        stages.perform([*m.collect(tick), *m.inject(tick)])
    assert m.leave(1) == [EndRequest(1)] and m.leave(1) == []
    stages.deliver_all(m)  # request 1's two waves among them
    assert m.dropped == 2
    for tick in range(2, 30):
        stages.deliver_all(m)
        stages.perform([*m.collect(tick), *m.inject(tick)])
    assert stages.emitted[2][:20] == greedy(PROMPTS[1], 20) and 1 not in stages.emitted


def test_a_request_a_stage_failed_ends_alone() -> None:
    m = StepMachine("tree", latency=2)
    stages = FakeStages()
    for req in (1, 2):
        stages.perform(m.join(req, PROMPTS[req - 1], FakeDraft(), 12, tick=0))
    stages.deliver_all(m)
    stages.perform([*m.collect(0), *m.inject(0)])
    assert m.fail(1, "stage 1 failed request: cache full") == [
        EndRequest(1),
        Fail(1, "stage 1 failed request: cache full"),
    ]
    assert m.fail(1, "again") == [] and list(m.runs) == [2]
    for tick in range(1, 40):
        stages.deliver_all(m)
        stages.perform([*m.collect(tick), *m.inject(tick)])
    assert stages.emitted[2][:10] == greedy(PROMPTS[1], 10)


def test_a_request_that_fills_the_context_fails_and_says_so() -> None:
    m = StepMachine("tree", latency=1, max_context=12)
    stages = FakeStages()
    stages.perform(m.join(1, [1, 2, 3], FakeDraft(), 12, tick=0))  # no max_new: the context bounds it
    for tick in range(40):
        stages.deliver_all(m)
        stages.perform([*m.collect(tick), *m.inject(tick)])
        if not m.runs:
            break
    assert stages.failed == {1: "the context of 12 tokens is full"} and stages.ended == [1]
    assert stages.emitted[1] == greedy([1, 2, 3], len(stages.emitted[1])) and len(stages.emitted[1]) >= 12 - 3 - 1


def test_max_new_bounds_what_is_drafted_into_a_wave() -> None:
    """A request that wants 6 tokens never has a node sent whose result would be a seventh (``room_end``)."""
    stages = run_lockstep("specpipe", 3, [PROMPTS[0]], 6, wave_size=16)
    assert stages.deepest[1] == len(PROMPTS[0]) - 1 + 6 - 1


def test_a_result_out_of_order_or_malformed_is_a_lost_peer() -> None:
    m = StepMachine("specpipe", latency=1, wave_size=4)
    stages = FakeStages()
    stages.perform(m.join(1, [3], FakeDraft(), 12, tick=0))
    stages.perform([*m.collect(0), *m.inject(0)])
    good = stages.pending[1].popleft()
    with pytest.raises(PeerLostError, match="malformed result"):
        m.deliver(StageResult(1, good.step, good.nodes, good.next_tokens, (), good.top_tokens, good.top_logprobs))
    m.deliver(
        StageResult(
            1, good.step + 5, good.nodes, good.next_tokens, good.next_logprobs, good.top_tokens, good.top_logprobs
        )
    )
    with pytest.raises(PeerLostError, match="out of order"):
        m.collect(1)


def test_features_go_to_the_draft_row_for_row_and_a_missing_hidden_is_refused() -> None:
    m = StepMachine("specpipe", latency=2, wave_size=6)
    stages, draft = FakeStages(), FakeDraft(wants_features=True)
    stages.perform(m.join(1, PROMPTS[2], draft, 12, tick=0), features=True)
    for tick in range(12):
        stages.deliver_all(m)
        stages.perform([*m.collect(tick), *m.inject(tick)], features=True)
    assert draft.prefix_seen == [(0, len(PROMPTS[2]) - 1)]
    assert draft.features and all(draft.features)
    m2 = StepMachine("specpipe", latency=1)
    m2.join(1, [4, 5], FakeDraft(wants_features=True), 12, tick=0)
    m2.deliver(StageResult(1, PREFIX_STEP, top_tokens=[[1]], top_logprobs=[[-0.1]], hidden=None))
    with pytest.raises(PeerLostError, match="hidden states"):
        m2.collect(0)


def test_a_traced_tree_says_where_each_wave_is() -> None:
    m = StepMachine("specpipe", latency=3, wave_size=2)
    stages = FakeStages()
    stages.perform(m.join(1, [5, 6], FakeDraft(), 12, tick=0, trace=True))
    for tick in range(3):
        stages.deliver_all(m)
        stages.perform([*m.collect(tick), *m.inject(tick)])
    stages.deliver_all(m)
    emit = next(a for a in m.collect(3) if isinstance(a, Emit))
    assert emit.step.tree is not None
    where = {row.node: (row.state, row.stage) for row in emit.step.tree}
    sent_at = {n: t for t, nodes in [(0, [0]), *m.runs[1].in_flight] for n in nodes}
    for node, (state, stage) in where.items():
        if state == NodeState.DONE.value:
            assert stage == 2  # the last stage
        elif state == NodeState.SENT.value:
            assert stage == 3 - sent_at[node] - 1  # sent at tick t: it left stage 3 - t - 1 by tick 3
        else:
            assert stage == -1
