"""The speculative token tree: the one data structure every decoding mode shares. Pure: stdlib only.

Vocabulary (used everywhere in HomeSpec):

- **root**: the node of the last committed token. Its KV is *not* in the committed prefix of any stage yet; it
  is computed as a tree node (at position = committed length - 1), and its result is the next token.
- **draft node**: a token proposed by a draft source as a child of a node, with the draft's log-probability;
  its **score** is the cumulative draft log-probability from the root (the root scores 0).
- **wave**: the nodes sent to the target together (one micro-batch through the stages). A node is sent only after
  (or together with) its parent, so every stage can attend to its ancestors.
- **result**: the target's next token after a node (greedy argmax, or the keyed draw of DESIGN §4.4).
- **accepted path**: from the root, each node whose token equals its parent's result.
- **bonus token**: the result of the deepest accepted node. If it is a child in the tree the walk goes on;
  if not, the tree is re-rooted at it with no children: a **flush**.
- **committed** nodes: the accepted path above the new root; their KV moves into every stage's prefix.
- **pruned subtree** / **dead** nodes: everything outside the new root's subtree; stages drop their rows and KV.

**room**: a request may only need tokens up to a last position (its prompt plus ``max_tokens``, within the context);
draft nodes past ``max_position`` stay in the tree but are never sent, so nothing past the room is ever computed or
committed on a stage.

Node ids are unique within one request (a counter never reused), so messages can name nodes across stages and
steps. Positions are absolute token positions; depth = position - root position.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import NewType

NodeId = NewType("NodeId", int)
TokenId = NewType("TokenId", int)

#: The parent id a wave row carries for the root: "attend to the committed prefix only".
PREFIX_PARENT = -1


class NodeState(Enum):
    DRAFTED = "drafted"  # in the tree, not sent to the target yet
    SENT = "sent"  # in a wave on its way through the stages
    DONE = "done"  # the target's result for this node is known


@dataclass(slots=True)
class Node:
    id: NodeId
    parent: NodeId | None  # None for the root
    token: TokenId
    position: int  # absolute position of this token
    score: float  # cumulative draft log-prob from the root (root: 0.0)
    source: str = ""  # the draft source that proposed it ("" for the root)
    state: NodeState = NodeState.DRAFTED
    result: TokenId | None = None  # the target's next token after this node
    children: dict[TokenId, NodeId] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WaveRow:
    """What a stage needs to compute one node: parent is ``PREFIX_PARENT`` for the root."""

    node: NodeId
    parent: int
    token: TokenId
    position: int


@dataclass(frozen=True, slots=True)
class Verification:
    """Outcome of one verification walk (DESIGN §4.1 step 2)."""

    emitted: tuple[TokenId, ...]  # tokens committed to the output, in order
    committed: tuple[NodeId, ...]  # nodes whose KV joins the committed prefix, in path order
    dead: tuple[NodeId, ...]  # pruned nodes (drafted or in flight)
    root: NodeId  # the new root
    flushed: bool  # the new root is a fresh node (the bonus token was not in the tree)
    accepted_drafts: int  # draft nodes accepted by this walk
    accepted_sources: tuple[str, ...] = ()  # the source of each accepted draft node, in order


class TokenTree:
    """A token tree rooted at the last committed token; see the module docstring for the vocabulary."""

    def __init__(self, root_token: int, root_position: int, first_id: int = 0, max_position: int | None = None) -> None:
        """``max_position``: the deepest position a draft node may be sent at (None: no limit). A request that may
        write tokens up to position L - 1 needs nodes up to L - 2 (a node's result is the token after it)."""
        if root_position < 0:
            raise ValueError(f"root position must be >= 0, got {root_position}")
        self.max_position = max_position
        self._next_id = first_id
        self._nodes: dict[NodeId, Node] = {}
        self._root = self._new_node(None, TokenId(root_token), root_position, 0.0, "").id

    # -- reading -------------------------------------------------------------------------------------------
    @property
    def root(self) -> Node:
        return self._nodes[self._root]

    @property
    def next_id(self) -> int:
        return self._next_id

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    def __iter__(self) -> Iterator[Node]:
        return iter(self._nodes.values())

    def node(self, node_id: int) -> Node:
        return self._nodes[NodeId(node_id)]

    def depth(self, node_id: int) -> int:
        return self._nodes[NodeId(node_id)].position - self.root.position

    def ancestors(self, node_id: int) -> list[NodeId]:
        """Ancestors of a node, nearest first, ending at the root (empty for the root)."""
        out: list[NodeId] = []
        parent = self._nodes[NodeId(node_id)].parent
        while parent is not None:
            out.append(parent)
            parent = self._nodes[parent].parent
        return out

    def path_tokens(self, node_id: int) -> list[TokenId]:
        """Tokens from the root to the node, both included."""
        ids = [NodeId(node_id), *self.ancestors(node_id)]
        return [self._nodes[i].token for i in reversed(ids)]

    def subtree(self, node_id: int) -> list[NodeId]:
        """The node and all its descendants, parents before children."""
        out = [NodeId(node_id)]
        i = 0
        while i < len(out):
            out.extend(self._nodes[out[i]].children.values())
            i += 1
        return out

    def leaves(self) -> list[NodeId]:
        return [n.id for n in self._nodes.values() if not n.children]

    def in_state(self, state: NodeState) -> list[NodeId]:
        """Nodes in a state, in topological order (position, then id)."""
        nodes = [n for n in self._nodes.values() if n.state is state]
        nodes.sort(key=lambda n: (n.position, n.id))
        return [n.id for n in nodes]

    def ready(self) -> list[NodeId]:
        """Drafted nodes that may be sent (within the room), in topological order: a whole-tree wave."""
        return [i for i in self.in_state(NodeState.DRAFTED) if self._in_room(self._nodes[i])]

    def rows(self, ids: Iterable[int]) -> list[WaveRow]:
        """Wave rows for nodes (their parent, token and position), in the order given."""
        out = []
        for i in ids:
            n = self._nodes[NodeId(i)]
            parent = PREFIX_PARENT if n.parent is None else int(n.parent)
            out.append(WaveRow(n.id, parent, n.token, n.position))
        return out

    # -- growing -------------------------------------------------------------------------------------------
    def add(self, parent: int, token: int, logp: float, source: str = "") -> tuple[NodeId, bool]:
        """Add a draft child; returns (id, created). An existing child with that token is reused."""
        p = self._nodes[NodeId(parent)]
        existing = p.children.get(TokenId(token))
        if existing is not None:
            return existing, False
        node = self._new_node(p.id, TokenId(token), p.position + 1, p.score + logp, source)
        p.children[node.token] = node.id
        return node.id, True

    def _new_node(self, parent: NodeId | None, token: TokenId, position: int, score: float, source: str) -> Node:
        node = Node(NodeId(self._next_id), parent, token, position, score, source)
        self._next_id += 1
        self._nodes[node.id] = node
        return node

    # -- waves ---------------------------------------------------------------------------------------------
    def _in_room(self, n: Node) -> bool:
        return n.parent is None or self.max_position is None or n.position <= self.max_position

    def _eligible(self, n: Node, picked: set[NodeId]) -> bool:
        if not self._in_room(n):
            return False
        return n.parent is None or self._nodes[n.parent].state is not NodeState.DRAFTED or n.parent in picked

    def wave_by_depth(self, k: int) -> list[NodeId]:
        """SpecPipe: among drafted nodes whose parent was sent, the shallowest depth, top-k by score."""
        ready = [n for n in self._nodes.values() if n.state is NodeState.DRAFTED and self._eligible(n, set())]
        if not ready:
            return []
        shallowest = min(n.position for n in ready)
        layer = [n for n in ready if n.position == shallowest]
        layer.sort(key=lambda n: (-n.score, n.id))
        return [n.id for n in layer[:k]]

    def wave_by_score(self, k: int) -> list[NodeId]:
        """FlowSpec: the k best-scoring drafted nodes, each sent with or after its parent (any depths)."""
        heap = [
            (-n.score, n.position, n.id)
            for n in self._nodes.values()
            if n.state is NodeState.DRAFTED and self._eligible(n, set())
        ]
        heapq.heapify(heap)
        picked: list[NodeId] = []
        picked_set: set[NodeId] = set()
        while heap and len(picked) < k:
            _, _, nid = heapq.heappop(heap)
            picked.append(nid)
            picked_set.add(nid)
            for child in self._nodes[nid].children.values():
                c = self._nodes[child]
                if c.state is NodeState.DRAFTED and self._in_room(c):
                    heapq.heappush(heap, (-c.score, c.position, c.id))
        return picked

    def mark_sent(self, ids: Iterable[int]) -> None:
        for i in ids:
            n = self._nodes[NodeId(i)]
            if n.state is not NodeState.DRAFTED:
                raise ValueError(f"node {i} was already sent")
            if n.parent is not None and self._nodes[n.parent].state is NodeState.DRAFTED:
                raise ValueError(f"node {i} sent before its parent {n.parent}")
            n.state = NodeState.SENT

    def set_result(self, node_id: int, token: int) -> bool:
        """Record the target's next token after a node. Returns False for a node no longer in the tree
        (pruned while in flight), which callers ignore."""
        n = self._nodes.get(NodeId(node_id))
        if n is None:
            return False
        if n.state is not NodeState.SENT:
            raise ValueError(f"result for node {node_id} in state {n.state.value}")
        n.state = NodeState.DONE
        n.result = TokenId(token)
        return True

    # -- verification --------------------------------------------------------------------------------------
    def verify(self) -> Verification:
        """Walk the accepted path from the root while results are known; re-root and prune.

        The new root is the deepest accepted node whose result is not known yet (kept with its subtree), or,
        after a flush, a fresh node holding the bonus token.
        """
        cur = self.root
        emitted: list[TokenId] = []
        committed: list[NodeId] = []
        sources: list[str] = []
        flushed = False
        while cur.state is NodeState.DONE:
            assert cur.result is not None
            emitted.append(cur.result)
            committed.append(cur.id)
            child = cur.children.get(cur.result)
            if child is None:
                flushed = True
                break
            cur = self._nodes[child]
            sources.append(cur.source)
        if not emitted:
            return Verification((), (), (), self._root, False, 0)
        if flushed:
            keep: set[NodeId] = set()
            new_root = self._new_node(None, emitted[-1], cur.position + 1, 0.0, "")
            keep.add(new_root.id)
        else:
            new_root = cur
            keep = set(self.subtree(cur.id))
        gone = set(committed)
        dead = [i for i in self._nodes if i not in keep and i not in gone]
        for i in dead:
            del self._nodes[i]
        for i in committed:
            del self._nodes[i]
        base = new_root.score
        for i in keep:
            self._nodes[i].score -= base
        new_root.parent = None
        new_root.source = ""
        self._root = new_root.id
        return Verification(
            tuple(emitted), tuple(committed), tuple(dead), new_root.id, flushed, len(sources), tuple(sources)
        )


def reference_mask(parents: dict[int, int], cached: Sequence[int], wave: Sequence[int]) -> list[list[bool]]:
    """Brute-force tree attention mask over tree slots: row i = wave[i], columns = cached + wave.

    ``parents`` maps every node to its parent (``PREFIX_PARENT`` for a root). A row attends to a column iff the
    column's node is the row's node or one of its ancestors. (The committed prefix, always attended, is not
    part of this matrix.) Used to test the stages' incremental masks.
    """
    columns = [*cached, *wave]
    out = []
    for node in wave:
        chain = {node}
        p = parents[node]
        while p != PREFIX_PARENT:
            chain.add(p)
            p = parents[p]
        out.append([c in chain for c in columns])
    return out
