"""Draft sources without a model: prompt lookup, token recycling, mixing, and the spec parser."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from homespec.config import TreeConfig
from homespec.core.tree import NodeState, TokenTree
from homespec.errors import DraftError
from homespec.model.drafts import MixDraft, NgramDraft, RecycleDraft, build_draft
from homespec.model.drafts.ngram import find_continuations


def draft_tokens(tree: TokenTree) -> dict[tuple[int, ...], float]:
    """Every non-root node as its token path from the root -> score."""
    return {tuple(tree.path_tokens(n.id)[1:]): n.score for n in tree if n.parent is not None}


def test_find_continuations_takes_the_longest_suffix_match_most_recent_first() -> None:
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 5, 2, 3]
    assert find_continuations(tokens, max_n=3, min_n=1, length=2, limit=4) == (2, [[7, 5], [9, 1]])
    assert find_continuations([4, 5, 6], max_n=3, min_n=1, length=2, limit=4) == (0, [])


def test_ngram_draft_proposes_what_followed_in_the_prompt() -> None:
    prompt = [10, 11, 12, 13, 14, 10, 11]
    tree = TokenTree(prompt[-1], len(prompt) - 1)
    d = NgramDraft(depth=3, width=2)
    d.start(prompt)
    assert d.propose(tree, prompt, budget=8) == 3
    assert set(draft_tokens(tree)) == {(12,), (12, 13), (12, 13, 14)}


def test_ngram_scores_follow_how_often_this_requests_lookups_were_right() -> None:
    """Each verification tells prompt lookup which of its children under committed nodes were right, by the length
    of the match they continued; a request where the copies of 2-token matches keep missing scores its next such
    continuations lower (a summary) and leaves other lengths at the prior; a new request starts from the prior."""
    prompt = [10, 11, 12, 13, 14, 10, 11]
    d = NgramDraft(depth=3, width=2)
    d.start(prompt)
    committed = list(prompt)
    tree = TokenTree(committed[-1], len(committed) - 1)
    d.propose(tree, committed, budget=8)
    first = max(n.score for n in tree if n.parent is not None)
    assert math.isclose(first, math.log(0.9)) and d.rate(2) == pytest.approx(0.9)
    for i in range(3):  # the target never continues the copy: a new word each time
        tree.mark_sent(tree.in_state(NodeState.DRAFTED))
        for node in list(tree):
            tree.set_result(node.id, 100 + i)
        v = tree.verify()
        committed.extend(v.emitted)
        d.observe(v, committed)
        committed.extend([10, 11])  # the text comes back to the repeated words (a 2-token match)
        tree = TokenTree(committed[-1], len(committed) - 1)
        d.propose(tree, committed, budget=8)
    assert d.trials[2] >= 3 and d.hits[2] == 0  # every child of a committed root, each time
    assert d.rate(2) < 0.5 and d.rate(3) == pytest.approx(0.9) and set(d.trials) == {2}
    assert max(n.score for n in tree if n.parent is not None) < first + math.log(d.rate(2) / 0.9) + 1e-9
    d.start(prompt)
    assert d.rate(2) == pytest.approx(0.9)


def test_ngram_goes_on_with_its_copy_under_other_sources_children() -> None:
    """In a union another source may have put children under the end of prompt lookup's copy: the copy's end is
    still prompt lookup's to continue (it expands the nodes it has not continued, not only the leaves)."""
    prompt = [10, 11, 12, 13, 14, 15, 16, 10, 11]
    d = NgramDraft(depth=2, width=1)
    d.start(prompt)
    tree = TokenTree(prompt[-1], len(prompt) - 1)
    assert d.propose(tree, prompt, budget=2) == 2
    end = next(n.id for n in tree if tree.path_tokens(n.id)[1:] == [12, 13])
    tree.add(end, 77, -0.1, "recycle")  # another source's child: the copy's end is no longer a leaf
    assert d.propose(tree, prompt, budget=2) == 2
    assert {(12, 13, 14), (12, 13, 14, 15)} <= set(draft_tokens(tree))


def test_recycle_learns_the_latest_top_k_and_grows_best_first() -> None:
    d = RecycleDraft(k=2)
    d.learn([5, 6], [[6, 7], [8, 9]], [[-0.1, -2.0], [-0.2, -0.5]])
    d.learn([7], [[1, 2]], [[-3.0, -4.0]])
    tree = TokenTree(5, 10)
    assert d.propose(tree, [5], budget=3) == 3
    got = draft_tokens(tree)
    # best-first by cumulative log-prob: 6 (-0.1), 6->8 (-0.3), 6->9 (-0.6); 7 (-2.0) is not reached
    assert set(got) == {(6,), (6, 8), (6, 9)}
    assert got[(6, 8)] == pytest.approx(-0.3)
    d.learn([5], [[7, 6]], [[-0.05, -3.0]])  # the row is replaced, not merged
    tree = TokenTree(5, 10)
    d.propose(tree, [5], budget=1)
    assert set(draft_tokens(tree)) == {(7,)}


@settings(max_examples=50, deadline=None)
@given(
    rows=st.dictionaries(
        st.integers(0, 20),
        st.lists(st.tuples(st.integers(0, 20), st.floats(-8.0, 0.0)), min_size=1, max_size=4, unique_by=lambda x: x[0]),
        min_size=1,
    ),
    budget=st.integers(0, 30),
    root=st.integers(0, 20),
)
def test_recycle_adds_at_most_the_budget_and_only_table_children(
    rows: dict[int, list[tuple[int, float]]], budget: int, root: int
) -> None:
    d = RecycleDraft(k=4)
    for token, row in rows.items():
        d.learn([token], [[t for t, _ in row]], [[lp for _, lp in row]])
    tree = TokenTree(root, 0)
    added = d.propose(tree, [root], budget)
    assert added == len(tree) - 1 <= budget
    for node in tree:
        if node.parent is not None:
            parent = tree.node(node.parent)
            table = dict(rows[parent.token])
            assert node.token in table
            assert node.score == pytest.approx(parent.score + table[node.token])
            assert node.state is NodeState.DRAFTED
    # best-first: no candidate left out scores better than a node that was added
    if added == budget and added:
        worst = min(n.score for n in tree if n.parent is not None)
        for node in tree:
            for token, lp in rows.get(node.token, []):
                if token not in node.children and node.position - tree.root.position < d.max_depth:
                    assert node.score + lp <= worst + 1e-9


def test_recycle_table_survives_a_save_and_load(tmp_path: Path) -> None:
    path = tmp_path / "t" / "recycle.json"
    d = RecycleDraft(path=path)
    d.learn([3], [[4, 5]], [[-0.5, -1.5]])
    d.save()
    again = RecycleDraft(path=path)
    assert again.table == {3: ((4, 5), (-0.5, -1.5))}
    path.write_text("not json")
    with pytest.raises(DraftError, match="unreadable"):
        RecycleDraft(path=path)


def test_mix_lets_each_source_grow_the_same_tree_in_turn() -> None:
    prompt = [10, 11, 12, 13, 10]
    recycle = RecycleDraft(k=2)
    recycle.learn([11, 10], [[12, 40], [11, 41]], [[-0.1, -1.0], [-0.2, -1.2]])
    mix = MixDraft([NgramDraft(depth=2, width=1), recycle])
    assert mix.name == "ngram+recycle" and mix.learns
    tree = TokenTree(prompt[-1], len(prompt) - 1)
    mix.start(prompt)
    added = mix.propose(tree, prompt, budget=5)
    got = draft_tokens(tree)
    # prompt lookup first (11, 12); recycling adds what its table offers that is not there yet: 41 and 11 -> 40
    assert set(got) == {(11,), (11, 12), (41,), (11, 40)} and added == 4
    assert got[(11,)] == pytest.approx(math.log(0.9))  # the ngram node keeps its own score


def test_build_draft_parses_specs(tmp_path: Path) -> None:
    tree = TreeConfig()
    target: Any = None  # none of these specs reads the target
    assert build_draft("none", target, None, tree).name == "none"
    assert isinstance(build_draft("recycle", target, None, tree), RecycleDraft)
    mix = build_draft("ngram+recycle", target, None, tree)
    assert isinstance(mix, MixDraft) and [s.name for s in mix.sources] == ["ngram", "recycle"]
    r = build_draft(f"recycle:{tmp_path / 'r.json'}", target, None, tree)
    assert isinstance(r, RecycleDraft) and r.path == tmp_path / "r.json"
    for bad in ("nope", "ngram+ngram", "none+recycle", "ngram+"):
        with pytest.raises(DraftError):
            build_draft(bad, target, None, tree)


def test_auto_plays_arms_in_windows_and_every_base_keeps_learning() -> None:
    """The bandit's arms share their bases: a base that is not playing still learns (the recycling table fills
    while prompt lookup plays), and each window's reward is tokens per verification (no draft cost here)."""
    from homespec.model.drafts.auto import AutoDraft

    recycle = RecycleDraft(k=2)
    auto = AutoDraft(
        {"ngram": NgramDraft(depth=3, width=1), "recycle": recycle}, ["ngram", "recycle"], period=2, min_tokens=1
    )
    assert auto.learns and not auto.wants_features
    prompt = [10, 11, 12, 13, 10, 11]
    auto.set_mode("ar")
    auto.start(prompt)
    first = auto.arm
    committed = list(prompt)
    tree = TokenTree(prompt[-1], len(prompt) - 1)
    following = {10: 11, 11: 12, 12: 13, 13: 10}  # the target continues the repeating text
    for _ in range(4):
        auto.propose(tree, committed, budget=4)
        wave = tree.in_state(NodeState.DRAFTED)
        tree.mark_sent(wave)
        for node in wave:
            tree.set_result(node, following.get(tree.node(node).token, 10))
        auto.learn([committed[-1]], [[99, 98]], [[-0.1, -0.2]])
        v = tree.verify()
        committed.extend(v.emitted)
        auto.observe(v, committed)
    assert recycle.table  # learned while prompt lookup was playing
    assert len(auto.choices) == 3 and auto.choices[0].startswith(f"@0: {first} (explore")
    second = auto.choices[1].split()[1]
    assert second != first and "explore" in auto.choices[1]  # the other arm is tried next
    assert auto.bandit.weight[first] > 0 and auto.bandit.weight[second] > 0


def test_auto_builds_the_arms_it_can_and_refuses_unknown_bases() -> None:
    from homespec.model.drafts.auto import AutoDraft

    with pytest.raises(ValueError, match="distinct sources"):
        AutoDraft({"ngram": NgramDraft()}, ["ngram+head"])
    with pytest.raises(ValueError, match="period"):
        AutoDraft({"ngram": NgramDraft()}, ["ngram"], period=0)


def test_auto_with_free_drafting_plays_the_widest_arm() -> None:
    """In a pipelined mode an arm nested in a larger one has nothing to win (the larger tree holds its nodes):
    auto plays the maximal arms only; in ``ar`` every arm plays, on a bandit of its own."""
    from homespec.model.drafts.auto import AutoDraft, maximal_arms

    assert maximal_arms(["ngram", "ngram+recycle", "recycle+head", "head"]) == ["ngram+recycle", "recycle+head"]
    auto = AutoDraft({"ngram": NgramDraft(), "recycle": RecycleDraft(k=2)}, ["ngram", "ngram+recycle"], period=1)
    prompt = [10, 11, 12, 13, 10, 11]
    for _ in range(2):
        auto.set_mode("specpipe")
        auto.start(prompt)
        assert auto.arm == "ngram+recycle" and "only arm" in auto.choices[0]
        tree = TokenTree(prompt[-1], len(prompt) - 1)
        assert auto.propose(tree, prompt, budget=4) > 0
        tree.mark_sent(tree.in_state(NodeState.DRAFTED))
        for node in list(tree):
            tree.set_result(node.id, 99)
        v = tree.verify()
        auto.observe(v, [*prompt, *v.emitted])
        auto.set_mode("ar")  # the specpipe window closes on its own bandit
        auto.start(prompt)
        assert "explore" in auto.choices[0] and auto.bandit.arms == ("ngram", "ngram+recycle")
