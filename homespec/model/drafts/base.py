"""The draft-source interface: propose children for the tree, learn from what the target accepted.

A draft source runs on the head, beside the pipeline. ``propose`` grows the request's TokenTree by at most
``budget`` nodes; ``observe`` is told every verification so the source can update its state (KV, tables);
``learn`` gets the target's top-k next tokens at every position it computed.
``committed`` is the whole committed token sequence (prompt + output); its last token is the tree's root.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from homespec.core.tree import TokenTree, Verification


class DraftSource(ABC):
    name: str = "draft"
    learns: bool = False  # wants ``learn`` calls (the decoders skip computing top-k for sources that do not)
    wants_features: bool = False  # wants the target's last-layer hidden states (a draft head)
    # EAGLE-3 (model/eagle.py): the target layers whose incoming streams make its features; with ``wants_features``
    # the decoders then hand it the stages' running fc sum instead of the last hidden states
    feature_taps: tuple[int, ...] = ()
    forwards: int = 0  # draft forward passes so far (model drafts and heads), for stats
    cost: float = 0.0  # draft compute so far, in target forwards (a parameter-count proxy; 0 for table lookups)
    choices: tuple[str, ...] = ()  # ``auto``: the choices made in the current request, with their reasons

    def start(self, prompt: Sequence[int]) -> None:  # noqa: B027 (optional hook)
        """A new request begins with this prompt."""

    def set_mode(self, mode: str) -> None:  # noqa: B027 (optional hook)
        """The next request's decoding mode (``auto`` weighs draft cost by whether it runs beside the target)."""

    @abstractmethod
    def propose(self, tree: TokenTree, committed: Sequence[int], budget: int) -> int:
        """Add at most ``budget`` draft nodes to ``tree``; return how many were added."""

    def observe(self, verification: Verification, committed: Sequence[int]) -> None:  # noqa: B027
        """The target verified the tree; ``committed`` already includes the emitted tokens."""

    def learn(  # noqa: B027 (optional hook)
        self, tokens: Sequence[int], top_tokens: Sequence[Sequence[int]], top_logprobs: Sequence[Sequence[float]]
    ) -> None:
        """The target's top-k next tokens (and log-probs) after each of ``tokens``, each in its own context: every
        node it computed and every prompt position. Token recycling builds its table from these."""

    def save(self) -> None:  # noqa: B027 (optional hook)
        """Write state that has a file (``recycle:FILE``); called when the engine closes."""

    def prefix_features(self, start: int, hidden: Any) -> None:  # noqa: B027 (optional hook)
        """The target's last-layer hidden states [n, hidden] at prompt positions start .. start + n - 1."""

    def tree_features(self, nodes: Sequence[int], hidden: Any) -> None:  # noqa: B027 (optional hook)
        """The target's last-layer hidden states [n, hidden] at tree nodes it computed."""


def forward_params(config: Any, layers: int, lm_head: bool) -> int:
    """Weights a forward over ``layers`` decoder layers (and the LM head) multiplies by: the unit of draft cost."""
    h, inter = int(config.hidden_size), int(config.intermediate_size)
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    d = int(getattr(config, "head_dim", None) or h // heads)
    per_layer = 2 * h * heads * d + 2 * h * kv * d + 3 * h * inter
    return layers * per_layer + (int(config.vocab_size) * h if lm_head else 0)


class NoDraft(DraftSource):
    """Plain decoding: the tree is only its root."""

    name = "none"

    def propose(self, tree: TokenTree, committed: Sequence[int], budget: int) -> int:
        return 0
