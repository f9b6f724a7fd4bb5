"""Token tree: growth, waves, verification walk, pruning — literal cases and hypothesis against brute force."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from homespec.core.tree import PREFIX_PARENT, NodeState, TokenTree, reference_mask


def chain_tree() -> TokenTree:
    # root(10) -> 11 -> 12, root -> 21
    t = TokenTree(root_token=10, root_position=5)
    a, _ = t.add(t.root.id, 11, -0.1)
    t.add(a, 12, -0.2)
    t.add(t.root.id, 21, -1.0)
    return t


def test_add_reuses_existing_child_and_tracks_positions_and_scores() -> None:
    t = chain_tree()
    a, created = t.add(t.root.id, 11, -5.0)
    assert not created and t.node(a).token == 11
    b = t.node(a).children[12]
    assert t.node(b).position == 7 and t.depth(b) == 2
    assert t.node(b).score == pytest.approx(-0.3)
    assert t.path_tokens(b) == [10, 11, 12]
    assert t.rows([t.root.id])[0].parent == PREFIX_PARENT


def test_wave_by_depth_takes_shallowest_layer_top_k() -> None:
    t = chain_tree()
    assert t.wave_by_depth(5) == [t.root.id]
    t.mark_sent([t.root.id])
    layer = t.wave_by_depth(1)
    assert [t.node(i).token for i in layer] == [11]  # best score at depth 1
    assert sorted(t.node(i).token for i in t.wave_by_depth(5)) == [11, 21]


def test_wave_by_score_crosses_depths_in_score_order() -> None:
    t = chain_tree()
    wave = t.wave_by_score(3)
    assert [t.node(i).token for i in wave] == [10, 11, 12]  # 12 (-0.3) beats 21 (-1.0)
    t.mark_sent(wave)
    assert [t.node(i).token for i in t.wave_by_score(3)] == [21]


def test_mark_sent_refuses_child_before_parent() -> None:
    t = chain_tree()
    child = t.node(t.root.id).children[11]
    with pytest.raises(ValueError, match="before its parent"):
        t.mark_sent([child])


def test_verify_accepts_path_then_flushes_on_bonus() -> None:
    t = chain_tree()
    everything = t.in_state(NodeState.DRAFTED)
    t.mark_sent(everything)
    by_token = {t.node(i).token: i for i in everything}
    t.set_result(by_token[10], 11)  # accept 11
    t.set_result(by_token[11], 12)  # accept 12
    t.set_result(by_token[12], 99)  # bonus 99: not in the tree -> flush
    t.set_result(by_token[21], 5)
    v = t.verify()
    assert v.emitted == (11, 12, 99)
    assert v.committed == (by_token[10], by_token[11], by_token[12])
    assert v.dead == (by_token[21],)
    assert v.flushed and v.accepted_drafts == 2
    assert t.root.token == 99 and t.root.position == 8 and len(t) == 1


def test_verify_stops_at_unknown_result_and_keeps_subtree() -> None:
    t = chain_tree()
    root = t.root.id
    t.mark_sent([root])
    t.set_result(root, 11)
    v = t.verify()
    a = v.root
    assert v.emitted == (11,) and v.committed == (root,) and not v.flushed
    assert t.root.token == 11 and t.node(a).score == 0.0
    assert [t.node(i).token for i in t.subtree(a)] == [11, 12]
    assert len(v.dead) == 1  # the 21 branch


def test_verify_with_nothing_known_changes_nothing() -> None:
    t = chain_tree()
    v = t.verify()
    assert v.emitted == () and len(t) == 4


def test_late_result_for_pruned_node_is_ignored() -> None:
    t = chain_tree()
    t.mark_sent(t.in_state(NodeState.DRAFTED))
    other = t.node(t.root.id).children[21]
    t.set_result(t.root.id, 11)
    t.verify()
    assert t.set_result(other, 3) is False


@st.composite
def random_trees(draw: st.DrawFn) -> tuple[TokenTree, dict[int, int]]:
    t = TokenTree(root_token=0, root_position=draw(st.integers(0, 50)))
    for _ in range(draw(st.integers(0, 30))):
        ids = [n.id for n in t]
        parent = draw(st.sampled_from(ids))
        t.add(parent, draw(st.integers(0, 5)), -draw(st.floats(0, 3)))
    results = {n.id: draw(st.integers(0, 5)) for n in t}
    return t, results


@given(random_trees())
@settings(max_examples=200, deadline=None)
def test_verify_matches_brute_force_walk(case: tuple[TokenTree, dict[int, int]]) -> None:
    t, results = case
    before = {n.id: (n.parent, n.token, n.position) for n in t}
    t.mark_sent(t.in_state(NodeState.DRAFTED))
    for i, tok in results.items():
        t.set_result(i, tok)
    # brute force: follow results through children
    root = next(i for i, (p, _, _) in before.items() if p is None)
    path, emitted, node = [], [], root
    while True:
        path.append(node)
        emitted.append(results[node])
        kids = [i for i, (p, tok, _) in before.items() if p == node and tok == results[node]]
        if not kids:
            break
        node = kids[0]
    v = t.verify()
    assert list(v.emitted) == emitted and list(v.committed) == path
    assert set(v.dead) | set(v.committed) == set(before)
    assert v.flushed and t.root.token == emitted[-1]
    assert t.root.position == before[path[-1]][2] + 1


@given(random_trees(), st.integers(1, 8))
@settings(max_examples=200, deadline=None)
def test_waves_send_parents_first_and_cover_the_tree(case: tuple[TokenTree, dict[int, int]], k: int) -> None:
    t, _ = case
    for pick in (t.wave_by_depth, t.wave_by_score):
        sent: set[int] = set()
        while True:
            wave = pick(k)
            if not wave:
                break
            assert len(wave) <= k
            t.mark_sent(wave)  # raises if a child precedes its parent
            sent.update(wave)
        assert sent == {n.id for n in t}
        for n in t:
            n.state = NodeState.DRAFTED


def test_reference_mask_is_ancestor_closure() -> None:
    parents = {1: PREFIX_PARENT, 2: 1, 3: 1, 4: 2}
    m = reference_mask(parents, cached=[1, 2], wave=[3, 4])
    assert m == [[True, False, True, False], [True, True, False, True]]
