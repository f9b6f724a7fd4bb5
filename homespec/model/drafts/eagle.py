"""The ``eagle:PATH`` draft source: a published EAGLE-1/2 or EAGLE-3 head (``model/eagle.py``) grown into a
dynamic tree by the ``head`` source's policy (``drafts/head.py``), with the inputs each format was trained on.

EAGLE-1/2 reads the target's last hidden states after its final norm and drafts through the target's LM head, so a
node the target computed is scored by the target's own distribution. EAGLE-3 reads fc's sum over three of the
target's residual streams, which the stages add up as the activations pass (``feature_taps``: the decoders ask the
last stage for that sum instead of the last hidden states), and drafts through its own norm and draft-vocabulary LM
head, from its own prediction at every node (fc's sum cannot be decoded); a head without an LM head of its own
(``train-draft --eagle3``) drafts through its norm and the target's LM head, every token (or, naming a draft
vocabulary, those tokens and the prompt's where drafting costs target time, as the ``head`` source). On a CPU an
EAGLE-3 head's layer runs through the native glue in int8 (``EagleHead.use_glue``), as the ``head`` source's does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from homespec.core.tree import NodeId
from homespec.model.drafts.base import forward_params
from homespec.model.drafts.head import HeadDraft
from homespec.model.eagle import EagleHead
from homespec.model.stage import Stage


class EagleDraft(HeadDraft):
    def __init__(
        self,
        head: EagleHead,
        ends: Stage,
        path: Path,
        name: str = "eagle",
        depth: int = 6,
        width: int = 4,
        max_context: int = 4096,
    ) -> None:
        """``ends``: the target's embeddings, final norm and LM head (a Stage with no layers); ``path``: the head's
        file, which stages holding EAGLE-3's feature layers read their share of fc from."""
        super().__init__(head, ends, name, depth, width, max_context)  # type: ignore[arg-type]
        self.eagle, self.path = head, path
        cfg, target = head.cfg, ends.source.config
        self.feature_taps = cfg.taps
        full = forward_params(target, target.num_hidden_layers, lm_head=True)
        if cfg.version == 3:  # q/k/v read 2H; fc runs in the stages; the LM head is the draft vocabulary's
            wide = (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim * cfg.hidden
            self.layer_unit = (forward_params(target, 1, lm_head=False) + wide) / full
            if cfg.draft_vocab:  # its own LM head (else the target's, as the head source's)
                self.lm_unit = self._lm_full = cfg.draft_vocab * cfg.hidden / full
        self.layer_unit += (cfg.layers - 1) * forward_params(target, 1, lm_head=False) / full  # further layers

    def set_mode(self, mode: str) -> None:
        """An EAGLE-3 head naming a draft vocabulary was trained over those tokens alone (``train-draft --eagle3
        --draft-vocab``): it scores them (and the prompt's) in every mode, its logits for the rest never having been
        trained down. Measured (BENCHMARKS.md §3, specpipe S = 8): 1124 steps against 1155 over every token."""
        super().set_mode(mode)
        if self.eagle.cfg.version == 3:
            self.vocab_on = True

    def start(self, prompt: Sequence[int]) -> None:
        super().start(prompt)
        if self.eagle.columns is not None:  # EAGLE-3 with its own LM head: the target token of each draft id
            self.columns = self.eagle.columns  # (else HeadDraft's: the draft vocabulary's and the prompt's, or all)

    def _take(self, hidden: torch.Tensor) -> torch.Tensor:
        h = super()._take(hidden)
        return self.stage.final_norm(h) if self.eagle.cfg.version == 1 else h

    def _logits(self, nodes: list[NodeId]) -> torch.Tensor:
        if self.eagle.cfg.version == 1:
            return self.stage.logits(torch.stack([self._feature_of(n) for n in nodes]), normed=True)
        feat = torch.stack([self.predicted[n] for n in nodes])
        if self.eagle.cfg.draft_vocab:
            return self.eagle.logits(feat)
        return self.stage.logits(self.eagle.normed(feat).to(self.stage.dtype), self._head_w, normed=True)
