"""Rotary embeddings computed without transformers (model/rope.py) equal transformers' own for the rope types of
the Llama family (default, linear, llama3), in both spellings of config.json; other types go to transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from homespec.model.rope import Rotary, inv_freq, rope_parameters, rotary_for

DATA = Path(__file__).parent / "data"
LLAMA_70B = json.loads((DATA / "llama-3.1-70b-instruct" / "config.json").read_text())


def transformers_rotary(raw: dict[str, Any]) -> Any:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return LlamaRotaryEmbedding(config=LlamaConfig(**raw))


CONFIGS = {
    "default (the bundled SmolLM2)": None,
    "llama3 (Llama-3.1-70B)": LLAMA_70B,
    "linear": {**LLAMA_70B, "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    "default, old spelling": {**LLAMA_70B, "rope_scaling": None, "rope_theta": 1_000_000.0},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cos_and_sin_equal_transformers(name: str, bundled: Any) -> None:
    raw = CONFIGS[name] or bundled.raw
    ours = rotary_for(raw, lambda: None, "cpu")
    assert isinstance(ours, Rotary), "computed here, without transformers"
    positions = torch.tensor([[0, 1, 7, 100, 4095, 8191, 20000, 131071]])
    probe = torch.empty(0, dtype=torch.float32)
    want_cos, want_sin = transformers_rotary(raw)(probe, positions)
    got_cos, got_sin = ours(probe, positions)
    torch.testing.assert_close(got_cos, want_cos, rtol=0, atol=0)
    torch.testing.assert_close(got_sin, want_sin, rtol=0, atol=0)


def test_the_two_spellings_read_alike() -> None:
    new = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}}
    old = {"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", "factor": 8.0}}
    assert rope_parameters(new)["rope_type"] == rope_parameters(old)["rope_type"] == "llama3"
    assert rope_parameters(old)["rope_theta"] == 500000.0
    assert rope_parameters({})["rope_type"] == "default" and rope_parameters({})["rope_theta"] == 10000.0


def test_other_rope_types_use_transformers() -> None:
    yarn = {
        **LLAMA_70B,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    }
    assert inv_freq(yarn) is None
    module = rotary_for(yarn, lambda: __import__("transformers").LlamaConfig(**yarn), "cpu")
    assert not isinstance(module, Rotary)
