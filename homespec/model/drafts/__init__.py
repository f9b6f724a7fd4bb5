"""Draft sources behind one interface (``base.DraftSource``), and ``build_draft`` to make one from a spec.

Specs: ``none``, ``ngram``, ``recycle`` or ``recycle:FILE`` (token recycling; with FILE the table is loaded from it
and saved back by ``save``), ``early-exit`` or ``early-exit:K`` (the target's first K layers + its norm and head),
``model:PATH`` (a small model with the same tokenizer: folder, .gguf or repo id), ``head`` or ``head:FILE`` (an
EAGLE-style draft head: the one shipped for the target, or a trained file), ``eagle:PATH`` (a published EAGLE-1/2
or EAGLE-3 head: a folder with config.json and its weights, or the weights file; ``model/eagle.py``) or ``eagle``
(the EAGLE-3 head shipped for the target), and any of these joined by ``+`` (one tree grown by each in turn, e.g.
``ngram+recycle``), or ``auto`` (SPIN: a bandit choosing among mixes of ``ngram``, ``recycle`` and the head shipped
for the target, when there is one: the EAGLE-3 one, else the ``head`` one; ``drafts/auto.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from homespec.config import DRAFT_SPECS, TreeConfig
from homespec.errors import DraftError
from homespec.model.drafts.base import DraftSource, NoDraft, forward_params
from homespec.model.drafts.mix import MixDraft
from homespec.model.drafts.model import ModelDraft
from homespec.model.drafts.ngram import NgramDraft
from homespec.model.drafts.recycle import RecycleDraft
from homespec.model.loader import ModelSource

__all__ = [
    "AUTO_ARMS",
    "DraftSource",
    "MixDraft",
    "ModelDraft",
    "NgramDraft",
    "NoDraft",
    "RecycleDraft",
    "build_draft",
]

# Order is priority within a step's budget: prompt lookup where the text repeats, then recycling or the head.
AUTO_ARMS = ("ngram+recycle", "ngram+head+recycle", "ngram+eagle+recycle")  # measured: BENCHMARKS.md §1, §2, §3
SHIPPED_HEADS = Path(__file__).resolve().parents[2] / "assets" / "heads"


def build_draft(
    spec: str,
    target: ModelSource,
    target_tokenizer: Any,
    tree: TreeConfig,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    max_context: int = 4096,
    weights: str = "auto",
    taps: str | None = None,
) -> DraftSource:
    """``weights``: the target's own format (the engine's, resolved): the target's embeddings, LM head and layers that
    a draft reuses (``head``, ``eagle``, ``early-exit``) run as the target's stages hold them (the int4 run's LM head is
    int8: a tenth of the fp32 one's time per call here); a draft never changes the output. ``taps``: the EAGLE-3 head
    whose fc the stages add up (``EngineOptions.taps``; None: the caller starts them as the draft needs) — ``auto``
    drafts with the shipped EAGLE-3 head only where the stages hold its taps, else with the EAGLE-1-style one."""
    from homespec.model.stage import Stage

    if spec == "auto":
        return _auto(target, target_tokenizer, tree, dtype, device, max_context, weights, taps)
    if "+" in spec:
        parts = [p.strip() for p in spec.split("+")]
        if len(parts) != len(set(parts)) or "none" in parts or not all(parts):
            raise DraftError(f"bad draft combination {spec!r}", hint="join different sources, e.g. ngram+recycle")
        return MixDraft(
            [build_draft(p, target, target_tokenizer, tree, dtype, device, max_context, weights) for p in parts]
        )
    kind, _, arg = spec.partition(":")
    if kind == "none" and not arg:
        return NoDraft()
    if kind == "ngram" and not arg:
        return NgramDraft(depth=max(tree.depth, 8), width=tree.width)
    if kind == "recycle":
        return RecycleDraft(path=Path(arg).expanduser() if arg else None)
    if kind == "head":
        from homespec.model.drafts.head import HeadDraft
        from homespec.model.head import load_head

        path = Path(arg).expanduser() if arg else _shipped_head(target)
        head = load_head(path, target.config, dtype, device)
        ends = Stage(target, 0, 0, embed=True, head=True, dtype=dtype, device=device, weights=weights)
        return HeadDraft(head, ends, "head", tree.depth, tree.width, max_context)
    if kind == "eagle":
        from homespec.model.drafts.eagle import EagleDraft
        from homespec.model.eagle import eagle_folder, load_eagle

        path = eagle_folder(arg or shipped_eagle(target))
        eagle = load_eagle(path, target.config, dtype, device)
        ends = Stage(target, 0, 0, embed=True, head=True, dtype=dtype, device=device, weights=weights)
        return EagleDraft(eagle, ends, path, f"eagle{eagle.cfg.version}", tree.depth, tree.width, max_context)
    if kind == "early-exit":
        layers = _early_exit_layers(arg, target.num_layers)
        stage = Stage(target, 0, layers, embed=True, head=True, dtype=dtype, device=device, weights=weights)
        unit = forward_params(target.config, layers, True) / forward_params(target.config, target.num_layers, True)
        return ModelDraft(stage, f"early-exit:{layers}", tree.depth, tree.width, max_context, unit=unit)
    if kind == "model" and arg:
        from homespec.model.loader import resolve

        source = resolve(arg)
        _check_same_tokenizer(target_tokenizer, source.tokenizer(), arg)
        stage = Stage(source, 0, source.num_layers, dtype=dtype, device=device)
        own = forward_params(source.config, source.num_layers, True)
        unit = own / forward_params(target.config, target.num_layers, True)
        return ModelDraft(stage, f"model:{arg}", tree.depth, tree.width, max_context, unit=unit)
    raise DraftError(f"unknown draft source {spec!r}", hint=f"one of: {DRAFT_SPECS}")


def _auto(
    target: ModelSource,
    tokenizer: Any,
    tree: TreeConfig,
    dtype: torch.dtype,
    device: str,
    max_context: int,
    weights: str = "auto",
    taps: str | None = None,
) -> DraftSource:
    from homespec.model.drafts.auto import AutoDraft

    names = ["ngram", "recycle"]
    shipped = shipped_eagle(target, required=False)
    if shipped and taps in (None, shipped):  # the head shipped for this target: the EAGLE-3 one where the stages can
        names.append("eagle")
    else:
        try:
            _shipped_head(target)
            names.append("head")
        except DraftError:
            pass  # no head for this target: the arms without it
    bases = {n: build_draft(n, target, tokenizer, tree, dtype, device, max_context, weights) for n in names}
    arms = [a for a in AUTO_ARMS if all(p in bases for p in a.split("+"))]
    return AutoDraft(bases, arms)


def _shipped_head(target: ModelSource) -> Path:
    """The head shipped with HomeSpec for this target (matched by architecture fingerprint)."""
    from homespec.model.head import head_fingerprint, target_fingerprint

    want = target_fingerprint(target.config)
    for path in sorted(SHIPPED_HEADS.glob("*.safetensors")):
        if head_fingerprint(path) == want:
            return path
    raise DraftError(
        f"no draft head is shipped for {target.name}",
        hint="train one: homespec train-draft MODEL --out DIR, then --draft head:DIR/head.safetensors",
    )


def shipped_eagle(target: ModelSource, required: bool = True) -> str:
    """``shipped:NAME``, the EAGLE-3 head shipped with HomeSpec for this target (its config's ``homespec_target``
    is the target's fingerprint); "" where there is none and not ``required``."""
    import json

    from homespec.model.eagle import SHIPPED
    from homespec.model.head import target_fingerprint

    want = target_fingerprint(target.config)
    for config in sorted(SHIPPED_HEADS.glob("*/config.json")):
        try:
            found = json.loads(config.read_text()).get("homespec_target") == want
        except (OSError, ValueError):
            found = False
        if found:
            return SHIPPED + config.parent.name
    if not required:
        return ""
    raise DraftError(
        f"no EAGLE-3 head is shipped for {target.name}",
        hint="train one: homespec train-draft MODEL --eagle3 --out DIR, then --draft eagle:DIR/eagle3",
    )


def _early_exit_layers(arg: str, total: int) -> int:
    if not arg:
        return max(1, total // 4)
    if not arg.isdigit() or not (1 <= int(arg) < total):
        raise DraftError(f"early-exit needs a layer count in [1, {total - 1}], got {arg!r}")
    return int(arg)


def _check_same_tokenizer(target: Any, draft: Any, name: str) -> None:
    if target.get_vocab() != draft.get_vocab():
        raise DraftError(
            f"draft model {name!r} has a different tokenizer ({len(draft.get_vocab())} tokens vs "
            f"{len(target.get_vocab())} in the target)",
            hint="a draft model must share the target's tokenizer (e.g. SmolLM2-135M for SmolLM2-1.7B)",
        )
