"""Model families beyond the Llama layout, each a tiny random model made by transformers with its own config class
(no real checkpoint of them is on this machine): greedy ``generate`` through the engine, in one process (``ar``)
and over stage processes (``specpipe`` at S = 2 and 4), token-identical to transformers' greedy ``generate``. The
LM head is scaled so that greedy has no near-ties (checked: the smallest top-two gap is stated and asserted)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.slow

NEW = 24
PROMPT = [1, 504, 3101, 314, 253, 1345, 28, 2177, 30, 2]  # ids of the bundled tokenizer (its files are copied)
MIN_GAP = 1e-3  # the reference's smallest top-two logit gap over the reply: far above fp32 rounding (~1e-5 here)


def tiny(tmp_path: Path, kind: str, bundled: Any) -> Path:
    """A tiny random ``kind`` model with the bundled model's vocabulary and tokenizer files, its LM head scaled up."""
    from transformers import (
        AutoModelForCausalLM,
        Gemma3TextConfig,
        MixtralConfig,
        Phi3Config,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    common = dict(
        vocab_size=bundled.shape.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    config = {
        "qwen3": Qwen3Config(**common, head_dim=32),
        "phi3": Phi3Config(**common, pad_token_id=0),
        # a window of 8 keys on the local layers: the prompt and every reply cross it, tree nodes too
        "gemma3": Gemma3TextConfig(**common, head_dim=32, sliding_window=8, query_pre_attn_scalar=32,
                                   layer_types=["sliding_attention", "full_attention", *["sliding_attention"] * 2]),
        # 8 experts, 2 per token, renormalized; layer 1 dense. Routers scaled up so that rows choose differently
        "qwen3_moe": Qwen3MoeConfig(**common, head_dim=32, num_experts=8, num_experts_per_tok=2,
                                    moe_intermediate_size=48, mlp_only_layers=[1], norm_topk_prob=True),
        "mixtral": MixtralConfig(**common, num_local_experts=8, num_experts_per_tok=2),
    }[kind]  # fmt: skip
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        model.lm_head.weight.mul_(64.0)
        for name, p in model.named_parameters():
            if kind == "gemma3" and "norm" in name:  # they start at w = 0, a scale of (1 + 0)
                p.normal_(0.0, 0.3)
            if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):  # routers: decided choices
                p.mul_(50.0)
    folder = tmp_path / kind
    model.save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bundled.folder / name, folder / name)
    return folder


@pytest.mark.parametrize("kind", ["qwen3", "phi3", "gemma3", "qwen3_moe", "mixtral"])
def test_greedy_equals_transformers_in_every_mode(tmp_path: Path, kind: str, bundled: Any) -> None:
    from transformers import AutoModelForCausalLM

    from homespec.config import GenerationConfig
    from homespec.core.planner import default_wave_rows
    from homespec.engine import Engine, EngineOptions
    from homespec.events import GenerationFinished

    folder = tiny(tmp_path, kind, bundled)
    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        out = ref.generate(
            ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, attention_mask=torch.ones_like(ids)
        )
        logits = ref(out).logits[0, len(PROMPT) - 1 : -1].float()  # the logits each reply token was chosen from
    want = out[0, len(PROMPT) :].tolist()
    top2 = logits.topk(2, dim=-1).values
    assert float((top2[:, 0] - top2[:, 1]).min()) > MIN_GAP, "a near-tie in the reference: rescale the head"
    for mode, stages in (("ar", 1), ("specpipe", 2), ("specpipe", 4)):
        with Engine(EngineOptions(model=str(folder), mode=mode, stages=stages, draft="ngram")) as engine:
            assert engine.options.wave_size == default_wave_rows(engine.source.shape)  # the model's (``--wave-size 0``)
            got = None
            for event in engine.generate(PROMPT, GenerationConfig(max_tokens=NEW, stop_on_eos=False)):
                if isinstance(event, GenerationFinished):
                    got = list(event.tokens)
        assert got == want, f"{kind} {mode} S={stages}: {got} != {want}"
