"""Rotary position embeddings of the Llama family, read from ``config.json`` without importing transformers (a stage
process then starts seconds sooner; importing transformers' model code costs more than torch itself).

The inverse frequencies of the rope types these models publish — ``default``, ``linear`` and ``llama3`` — are
computed here as transformers computes them (``tests/test_rope.py`` checks them against it); any other type
(``dynamic``, ``yarn``, ``longrope``…) is handed to transformers' own rotary module.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

OWN_TYPES = ("default", "linear", "llama3")


def rope_parameters(raw: dict[str, Any]) -> dict[str, Any]:
    """The rope type, theta and scaling of a parsed ``config.json``, in either spelling: transformers 5's
    ``rope_parameters``, or ``rope_theta`` with ``rope_scaling``."""
    params = dict(raw.get("rope_parameters") or {})
    if not params:
        params = dict(raw.get("rope_scaling") or {})
        params.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or params.get("type") or "default"
    params["rope_type"] = kind
    return params


def head_dim(raw: dict[str, Any]) -> int:
    return int(raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"])


def inv_freq(raw: dict[str, Any]) -> torch.Tensor | None:
    """[head_dim / 2] inverse frequencies for ``raw``'s rope type, or None when it is not one of ``OWN_TYPES``."""
    p = rope_parameters(raw)
    kind, dim = p["rope_type"], head_dim(raw)
    if kind not in OWN_TYPES:
        return None
    base = 1.0 / (float(p["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if kind == "linear":
        return base / float(p["factor"])
    if kind == "llama3":
        return _llama3(base, p)
    return base


def _llama3(freq: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
    old = float(p["original_max_position_embeddings"])
    wavelen = 2 * math.pi / freq
    scaled = torch.where(wavelen > old / low, freq / factor, freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) * ~(wavelen > old / low)
    return torch.where(medium, smoothed, scaled)


class Rotary:
    """``rotary(probe, positions [1, n]) -> (cos, sin)`` each [1, n, head_dim] in ``probe``'s dtype, like
    transformers' rotary modules."""

    def __init__(self, freq: torch.Tensor, device: str) -> None:
        self.inv_freq = freq.to(device)

    def __call__(self, probe: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq  # [1, n, d / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(probe.dtype), emb.sin().to(probe.dtype)


def rotary_for(raw: dict[str, Any], config: Callable[[], Any], device: str) -> Any:
    """Our Rotary for the types we compute, else transformers' module built from the full ``config()``."""
    freq = inv_freq(raw)
    if freq is not None:
        return Rotary(freq, device)
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return LlamaRotaryEmbedding(config=config()).to(device)
