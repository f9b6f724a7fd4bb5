"""The tree-aware KV cache of one stage for one request (DESIGN §4.3).

Layout per layer: ``[committed prefix | tree slots]``, preallocated once. A wave's nodes append to the tree slots;
each node attends to the whole committed prefix, to its ancestors among the tree slots and to itself. On commit,
the committed nodes' slots are gathered right after the prefix in path order, dead slots are freed and the
surviving tree slots are packed after them. Nothing is re-allocated per step.

This module owns slot bookkeeping and masks; it knows node ids and parents, never tokens, drafts or sockets.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from homespec.core.tree import PREFIX_PARENT
from homespec.errors import CapacityError


class TreeKVCache:
    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        max_prefix: int,
        max_tree: int,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
    ) -> None:
        size = max_prefix + max_tree
        self.k = torch.zeros(num_layers, kv_heads, size, head_dim, dtype=dtype, device=device)  # [L, kvh, T, d]
        self.v = torch.zeros_like(self.k)  # [L, kvh, T, d]
        self.max_prefix = max_prefix
        self.max_tree = max_tree
        self.prefix_len = 0
        self.tree_ids: list[int] = []  # node id of tree slot i (stored at prefix_len + i)
        self.slot_of: dict[int, int] = {}  # node id -> tree slot index
        self.committed: set[int] = set()  # node ids moved into the prefix
        self._anc = torch.zeros(max_tree, max_tree, dtype=torch.bool, device=device)  # [slot, slot]
        self._device = device

    @property
    def tree_len(self) -> int:
        return len(self.tree_ids)

    def reserve_prefix(self, n: int) -> tuple[int, torch.Tensor]:
        """Make room for n committed tokens (a causal chunk); returns (write start, mask [n, start + n])."""
        if self.tree_ids:
            raise ValueError("prefix tokens can only be added while the tree is empty")
        if self.prefix_len + n > self.max_prefix:
            raise CapacityError(
                f"context of {self.prefix_len + n} tokens exceeds this cache's {self.max_prefix}",
                hint="raise --max-context",
            )
        start = self.prefix_len
        mask = torch.ones(n, start + n, dtype=torch.bool, device=self._device)
        mask[:, start:] = torch.ones(n, n, dtype=torch.bool, device=self._device).tril()
        self.prefix_len += n
        return start, mask

    def reserve_tree(self, node_ids: Sequence[int], parents: Sequence[int]) -> tuple[int, torch.Tensor]:
        """Give each node the next tree slot; returns (write start, mask [n, prefix + tree after append]).

        A parent may be an earlier row of the same wave, a node in a tree slot, a committed node (then the node
        hangs on the prefix) or ``PREFIX_PARENT``.
        """
        n = len(node_ids)
        first = len(self.tree_ids)
        if first + n > self.max_tree:
            raise CapacityError(f"tree of {first + n} nodes exceeds this cache's {self.max_tree} slots")
        if self.prefix_len + first + n > self.max_prefix + self.max_tree:
            raise CapacityError("KV cache full")
        anc = self._anc
        for i, (node, parent) in enumerate(zip(node_ids, parents, strict=True)):
            if node in self.slot_of or node in self.committed:
                raise ValueError(f"node {node} is already in the cache")
            slot = first + i
            anc[slot] = False
            if parent in self.slot_of:
                anc[slot] |= anc[self.slot_of[parent]]
            elif parent != PREFIX_PARENT and parent not in self.committed:
                raise ValueError(f"node {node} has unknown parent {parent}")
            anc[slot, slot] = True
            self.slot_of[node] = slot
            self.tree_ids.append(node)
        total = first + n
        mask = torch.ones(n, self.prefix_len + total, dtype=torch.bool, device=self._device)
        mask[:, self.prefix_len :] = anc[first:total, :total]
        return self.prefix_len + first, mask

    def commit(self, path: Sequence[int], dead: Iterable[int] = ()) -> None:
        """Move ``path`` (in order) into the prefix, free ``dead``, pack the surviving tree slots."""
        dead_set = {d for d in dead if d in self.slot_of}
        missing = [p for p in path if p not in self.slot_of]
        if missing:
            raise ValueError(f"commit of nodes not in this cache: {missing[:8]}")
        path_slots = [self.slot_of[p] for p in path]
        gone = set(path) | dead_set
        survivors = [s for s, node in enumerate(self.tree_ids) if node not in gone]
        if self.prefix_len + len(path_slots) > self.max_prefix:
            raise CapacityError(f"context of {self.prefix_len + len(path_slots)} tokens exceeds {self.max_prefix}")
        order = path_slots + survivors
        if order != list(range(len(order))):
            idx = torch.tensor(order, device=self._device) + self.prefix_len
            end = self.prefix_len + len(order)
            self.k[:, :, self.prefix_len : end] = self.k[:, :, idx]
            self.v[:, :, self.prefix_len : end] = self.v[:, :, idx]
        if survivors:
            keep = torch.tensor(survivors, device=self._device)
            m = len(survivors)
            self._anc[:m, :m] = self._anc[keep][:, keep]
            self._anc[:m, m:] = False
        self.prefix_len += len(path_slots)
        self.committed.update(path)
        self.tree_ids = [self.tree_ids[s] for s in survivors]
        self.slot_of = {node: i for i, node in enumerate(self.tree_ids)}

    def key_positions(self, width: int) -> torch.Tensor:
        """[width] the position of the key in each of the first ``width`` slots: a prefix slot's is its index; a
        tree node hangs on the end of the prefix, so its position is the prefix length plus its ancestors in the
        tree (for sliding-window attention)."""
        prefix = torch.arange(min(width, self.prefix_len), device=self._device)
        tree = width - len(prefix)
        if tree <= 0:
            return prefix
        depth = self._anc[:tree, :tree].sum(1)  # itself and its ancestors among the tree slots
        return torch.cat([prefix, self.prefix_len + depth - 1])

    def drop(self, dead: Iterable[int]) -> None:
        self.commit((), dead)

    def reset(self) -> None:
        """Empty the cache for a new request (the buffers are kept)."""
        self.prefix_len = 0
        self.tree_ids = []
        self.slot_of = {}
        self.committed = set()
