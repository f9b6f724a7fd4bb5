"""What the head injects at each pipeline step, per decoding mode (DESIGN §4). Pure: stdlib only.

The head runs in lockstep ticks: at tick t it first collects the wave injected at tick t - S (S stages, so the
pipeline holds up to S waves), verifies and prunes, then asks ``plan_injection`` for the next wave.

- ``pp``: only the root, and only when nothing is in flight: one token per S steps.
- ``tree``: the whole drafted tree, only when nothing is in flight: (accepted + 1) tokens per S steps.
- ``specpipe``: every tick, with ``by_score`` (the default) the k best-scoring nodes whose parents were sent
  (FlowSpec order: after a flush the first wave carries a whole tree, later ones extend it), or the next depth
  layer of the tree (SpecPipe order, top-k by score): about one token per step when the true token is always there.
"""

from __future__ import annotations

from typing import Literal

from homespec.core.tree import NodeId, NodeState, TokenTree

PipelineMode = Literal["pp", "tree", "specpipe"]

#: specpipe defaults, measured (BENCHMARKS.md §2, S = 8, ngram+recycle, each run with a cold draft): score-ordered
#: waves of 32 nodes give 0.257 tokens per step, of 16 0.242, of 8 0.215; depth layers of 8 give 0.192. A row is nearly
#: free on a memory-bound device (a 3090 stage of Llama-70B stays memory-bound up to ~39 rows).
DEFAULT_WAVE_SIZE = 32
DEFAULT_BY_SCORE = True


def draft_budget(mode: PipelineMode, tree: TokenTree, in_flight: int, wave_size: int, tree_budget: int) -> int:
    """How many draft nodes to add this tick."""
    if mode == "pp":
        return 0
    if mode == "tree":
        return tree_budget if in_flight == 0 else 0
    drafted = len(tree.in_state(NodeState.DRAFTED))
    return max(0, 2 * wave_size - drafted)


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
