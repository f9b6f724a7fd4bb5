"""The stage's incremental tree mask and KV compaction against brute force (tiny tensors, no model)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from homespec.core.tree import PREFIX_PARENT, reference_mask
from homespec.model.kv import TreeKVCache


def make_cache() -> TreeKVCache:
    return TreeKVCache(num_layers=2, kv_heads=1, head_dim=1, max_prefix=64, max_tree=64, dtype=torch.float32)


@given(st.data())
@settings(max_examples=150, deadline=None)
def test_masks_match_reference_through_waves_and_commits(data: st.DataObject) -> None:
    cache = make_cache()
    start, _ = cache.reserve_prefix(3)
    assert start == 0
    parents: dict[int, int] = {}
    next_id = 0
    live: list[int] = []
    for _ in range(data.draw(st.integers(1, 5))):
        wave, wave_parents = [], []
        for _ in range(data.draw(st.integers(1, 6))):
            choices = [PREFIX_PARENT] if not live and not wave else live + wave
            parent = data.draw(st.sampled_from(choices))
            parents[next_id] = parent
            wave.append(next_id)
            wave_parents.append(parent)
            next_id += 1
        start, mask = cache.reserve_tree(wave, wave_parents)
        cached = list(live)
        assert start == cache.prefix_len + len(cached)
        assert mask[:, : cache.prefix_len].all()
        assert mask[:, cache.prefix_len :].tolist() == reference_mask(parents, cached, wave)
        # mark each slot's KV with its node id to check compaction
        for i, node in enumerate(wave):
            cache.k[:, :, start + i] = float(node)
        live += wave
        if data.draw(st.booleans()):
            # commit a root-to-node path, kill everything outside the last node's subtree
            roots = [n for n in live if parents[n] == PREFIX_PARENT or parents[n] in cache.committed]
            path = [data.draw(st.sampled_from(roots))]
            while True:
                kids = [n for n in live if parents[n] == path[-1]]
                if not kids or not data.draw(st.booleans()):
                    break
                path.append(data.draw(st.sampled_from(kids)))
            keep = {n for n in live if _descends(n, path[-1], parents)} - {path[-1]}
            dead = [n for n in live if n not in keep and n not in path]
            before = cache.prefix_len
            cache.commit(path, dead)
            got = cache.k[0, 0, before : before + len(path), 0].tolist()
            assert got == [float(p) for p in path]
            live = [n for n in live if n in keep]
            for p in path:
                parents[p] = PREFIX_PARENT
            assert [cache.k[0, 0, cache.prefix_len + i, 0].item() for i in range(len(live))] == [float(n) for n in live]


def _descends(node: int, ancestor: int, parents: dict[int, int]) -> bool:
    while node != PREFIX_PARENT:
        if node == ancestor:
            return True
        node = parents[node]
    return False


def test_unknown_parent_is_refused() -> None:
    cache = make_cache()
    try:
        cache.reserve_tree([5], [4])
    except ValueError as exc:
        assert "unknown parent" in str(exc)
    else:
        raise AssertionError("expected ValueError")
