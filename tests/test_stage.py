"""Stages: a split equals the whole model; a stage reads only its own tensors; Llama-family variants (tiny random
models for plumbing, the real bundled model for equivalence)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from homespec.core.tree import TokenTree
from homespec.model.loader import open_folder
from homespec.model.stage import Stage


def tiny_model(tmp_path: Path, kind: str) -> Path:
    """A tiny random Llama-family model written as safetensors (plumbing only, never for losslessness)."""
    from transformers import (
        AutoModelForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    common = dict(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    config = {
        "llama": LlamaConfig(**common, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
        "qwen2": Qwen2Config(**common),
        "mistral": MistralConfig(**common),
        "qwen3": Qwen3Config(**common, head_dim=16),  # explicit head_dim, not hidden / heads (8)
        "phi3": Phi3Config(**common, pad_token_id=0),  # fused qkv and gate/up, split at load
        # a window of 4 keys on three of the four layers (8-token prompts cross it), scores scaled by 1/sqrt(24)
        "gemma3": Gemma3TextConfig(**common, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                                   layer_types=["sliding_attention", "full_attention", *["sliding_attention"] * 2],
                                   final_logit_softcapping=5.0),
        # 4 experts, 2 per token; layer 2 dense (mlp_only_layers), the top 2 renormalized
        "qwen3_moe": Qwen3MoeConfig(**common, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=24, mlp_only_layers=[2], norm_topk_prob=True),
        "mixtral": MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2),
    }[kind]  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    if kind == "gemma3":  # its norms start at w = 0, a scale of (1 + 0): make the (1 + w) visible
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(0.0, 0.3)
    folder = tmp_path / kind
    model.save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "qwen3", "phi3", "gemma3", "qwen3_moe", "mixtral"])
def test_split_stages_match_transformers_logits(tmp_path: Path, kind: str) -> None:
    from transformers import AutoModelForCausalLM

    folder = tiny_model(tmp_path, kind)
    source = open_folder(folder, kind)
    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    with torch.no_grad():
        want = ref(ids).logits[0]  # [8, vocab]
    stages = [Stage(source, 0, 1), Stage(source, 1, 3), Stage(source, 3, 4)]
    caches = [s.new_cache(64, 16) for s in stages]
    x: torch.Tensor = ids[0]
    for s, c in zip(stages, caches, strict=True):
        x = s.forward_prefix(c, x, range(8))
    torch.testing.assert_close(x, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["qwen2", "gemma3"])
def test_tree_wave_equals_sequential_decoding(tmp_path: Path, kind: str) -> None:
    """Siblings in one wave must not see each other: each branch's logits equal decoding that branch alone (Gemma 3:
    its window of 4 keys cuts into the prefix for the deeper nodes)."""
    source = open_folder(tiny_model(tmp_path, kind), "tiny")
    stage = Stage(source, 0, 4)
    prompt = [5, 6, 7, 8]
    tree = TokenTree(prompt[-1], len(prompt) - 1)
    a, _ = tree.add(tree.root.id, 11, 0.0)
    b, _ = tree.add(tree.root.id, 12, 0.0)
    c, _ = tree.add(a, 13, 0.0)
    cache = stage.new_cache(64, 16)
    stage.forward_prefix(cache, torch.tensor(prompt[:-1]), range(3))
    ids = [tree.root.id, a, b, c]
    rows = tree.rows(ids)
    got = stage.forward_tree(cache, rows, torch.tensor([r.token for r in rows]))
    for i, node in enumerate(ids):
        seq = [*prompt[:-1], *tree.path_tokens(node)]
        fresh = stage.new_cache(64, 16)
        want = stage.forward_prefix(fresh, torch.tensor(seq), range(len(seq)))[-1]
        torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-5)


def test_batched_requests_equal_each_alone(tmp_path: Path) -> None:
    """SpecPipe-DB's one forward per step: the rows of three requests (different prompts, contexts and trees, one
    with a single row) in one ``forward_batch`` equal each request's wave run alone, and fill the same KV."""
    source = open_folder(tiny_model(tmp_path, "llama"), "tiny")
    stage = Stage(source, 0, 4)
    prompts = [[5, 6, 7, 8], [9, 10], [20, 21, 22, 23, 24, 25, 26]]
    trees, waves = [], []
    for i, prompt in enumerate(prompts):
        tree = TokenTree(prompt[-1], len(prompt) - 1)
        a, _ = tree.add(tree.root.id, 11 + i, 0.0)
        if i != 1:
            tree.add(tree.root.id, 30 + i, 0.0)
            tree.add(a, 40 + i, 0.0)
        trees.append(tree)
        waves.append(tree.rows(sorted(n.id for n in tree)))
    alone, batched = [], []
    for cache_list in (alone, batched):
        for prompt in prompts:
            cache = stage.new_cache(64, 16)
            stage.forward_prefix(cache, torch.tensor(prompt[:-1]), range(len(prompt) - 1))
            cache_list.append(cache)
    want = [
        stage.forward_tree(c, rows, torch.tensor([r.token for r in rows])) for c, rows in zip(alone, waves, strict=True)
    ]
    segments = [stage.segment(c, rows) for c, rows in zip(batched, waves, strict=True)]
    rows = [r for w in waves for r in w]
    got = stage.forward_batch(segments, torch.tensor([r.token for r in rows]), [r.position for r in rows])
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-4, atol=1e-5)
    for a, b in zip(alone, batched, strict=True):
        n = a.prefix_len + a.tree_len
        assert (a.prefix_len, a.tree_ids) == (b.prefix_len, b.tree_ids)
        torch.testing.assert_close(a.k[:, :, :n], b.k[:, :, :n], rtol=1e-4, atol=1e-5)


def test_stage_reads_only_its_layers_and_matches_full_model(bundled: Any, reference_model: Any) -> None:
    from homespec.model.loader import ModelSource

    source = ModelSource(bundled.folder, "bundled", bundled.raw, bundled.weight_map)
    middle = Stage(source, 10, 20)
    assert source.tensors_read, "nothing was read"
    assert all(name.startswith(tuple(f"model.layers.{i}." for i in range(10, 20))) for name in source.tensors_read)
    assert len(source.tensors_read) == 10 * 9
    ids = torch.tensor([[1, 504, 3458, 5069, 25, 260, 4438, 282]])
    with torch.no_grad():
        hidden = reference_model(ids, output_hidden_states=True).hidden_states  # [layers + 1] x [1, n, hidden]
    out = middle.forward_prefix(middle.new_cache(64, 8), hidden[10][0], range(8))
    torch.testing.assert_close(out, hidden[20][0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["qwen3", "gemma3"])
def test_lockstep_decoding_equals_each_sequence_alone(tmp_path: Path, kind: str) -> None:
    """train-draft's lockstep batch (``forward_lockstep``): sequences of different lengths, right-aligned in one
    cache, decoded one row each per forward, give each sequence's own logits (Gemma 3: its window of 4 keys cuts
    into the longer ones; Qwen3: grouped query heads with their own norms)."""
    from homespec.model.stage import Lockstep

    source = open_folder(tiny_model(tmp_path, kind), "tiny")
    stage = Stage(source, 0, 4)
    seqs = [
        [5, 6, 7, 8, 9, 10, 11],
        [12, 13, 18, 19, 20],
        [14, 15, 16, 17, 21, 22],
    ]  # prompts, then 3 decoded tokens each
    prompts, steps = [s[:-3] for s in seqs], 3
    width = max(map(len, prompts))
    shape = (len(stage.layers), len(seqs), stage.kv_heads, width + steps, stage.head_dim)
    k, v = torch.zeros(shape), torch.zeros(shape)
    for j, p in enumerate(prompts):
        cache = stage.new_cache(32, 1)
        stage.forward_prefix(cache, torch.tensor(p), range(len(p)))
        k[:, j, :, width - len(p) : width], v[:, j, :, width - len(p) : width] = (
            cache.k[:, :, : len(p)],
            cache.v[:, :, : len(p)],
        )
    pad = torch.tensor([width - len(p) for p in prompts])
    for step in range(steps):
        x = torch.tensor([s[len(p) + step] for s, p in zip(seqs, prompts, strict=True)])
        got = stage.forward_lockstep(Lockstep(k, v, pad, width + step), x)
        for j, (s, p) in enumerate(zip(seqs, prompts, strict=True)):
            upto = s[: len(p) + step + 1]
            want = stage.forward_prefix(stage.new_cache(32, 1), torch.tensor(upto), range(len(upto)))[-1]
            torch.testing.assert_close(got[j], want, rtol=1e-4, atol=1e-5)
