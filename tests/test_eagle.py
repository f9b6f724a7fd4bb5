"""Published EAGLE heads (``--draft eagle:PATH``, model/eagle.py): files written here in the published layouts
(EAGLE-1's ``pytorch_model.bin`` with ``fc.bias`` and ``layers.0.*``; EAGLE-3's ``midlayer.*`` with a draft vocabulary
and ``d2t``; speculators' ``layers.0.*`` with ``norm_before_residual``) load, draft exactly what a reference forward
written here from the papers' description drafts on transformers' own hidden states, keep every mode lossless, and
EAGLE-3's fc summed across stages equals fc in one place over transformers' ``hidden_states[2, L//2, L-3]``.

The heads' weights are random (no published head exists for the bundled model): these tests prove the format, the
features and the plumbing, not acceptance."""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from homespec.config import GenerationConfig, SamplingConfig, TreeConfig
from homespec.core.messages import RawTensor, Wave
from homespec.core.tree import TokenTree
from homespec.errors import DraftError
from homespec.events import GenerationFinished
from homespec.model.drafts import build_draft
from homespec.model.eagle import load_eagle
from homespec.model.stage import Stage
from tests.conftest import EQUIVALENCE_PROMPTS

H, HEADS, KV, D, INTER = 576, 9, 3, 64, 1536  # the bundled SmolLM2-135M
DRAFT_VOCAB = 2048


def _w(g: torch.Generator, *shape: int, scale: float = 0.05) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def _norm(g: torch.Generator) -> torch.Tensor:
    return 1 + 0.1 * torch.randn(H, generator=g)


def _layer(g: torch.Generator, prefix: str, width: int) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}self_attn.q_proj.weight": _w(g, HEADS * D, width),
        f"{prefix}self_attn.k_proj.weight": _w(g, KV * D, width),
        f"{prefix}self_attn.v_proj.weight": _w(g, KV * D, width),
        f"{prefix}self_attn.o_proj.weight": _w(g, H, HEADS * D),
        f"{prefix}mlp.gate_proj.weight": _w(g, INTER, H),
        f"{prefix}mlp.up_proj.weight": _w(g, INTER, H),
        f"{prefix}mlp.down_proj.weight": _w(g, H, INTER),
        f"{prefix}post_attention_layernorm.weight": _norm(g),
    }


def _config(**extra: Any) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": H,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV,
        "intermediate_size": INTER,
        "num_hidden_layers": 1,
        "rms_norm_eps": 1e-5,
        "vocab_size": 49152,
        **extra,
    }


def _further(g: torch.Generator, layers: int) -> dict[str, torch.Tensor]:
    """Layers 1 .. ``layers`` - 1 of a head: plain Llama decoder layers, each with its input norm."""
    out: dict[str, torch.Tensor] = {}
    for i in range(1, layers):
        out |= {**_layer(g, f"layers.{i}.", H), f"layers.{i}.input_layernorm.weight": _norm(g)}
    return out


def write_eagle1(folder: Path, seed: int = 1, layers: int = 1) -> Path:
    """EAGLE-1/2 as SafeAILab publishes it: pytorch_model.bin, fc with a bias, layer 0 without an input norm (its
    ``num_hidden_layers`` further layers with theirs)."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"fc.weight": _w(g, H, 2 * H), "fc.bias": _w(g, H), **_layer(g, "layers.0.", H), **_further(g, layers)}
    torch.save(tensors, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(_config(bias=True, num_hidden_layers=layers)))
    return folder


def write_eagle3(folder: Path, seed: int = 3, speculators: bool = False, layers: int = 1) -> Path:
    """EAGLE-3 as SafeAILab publishes it (``midlayer.*``), or as vllm-project/speculators converts it (``layers.0.*``,
    the layer's settings under transformer_layer_config, ``norm_before_residual``); ``layers`` > 1: HomeSpec's
    extension (``train-draft --head-layers``), plain layers ``layers.1.*`` .. after the first."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    prefix = "layers.0." if speculators else "midlayer."
    used = torch.sort(torch.randperm(49152, generator=g)[:DRAFT_VOCAB]).values
    used[:256] = torch.arange(256)  # a draft vocabulary holds the most written tokens; here some low ids
    used = torch.unique(used)
    used = torch.cat([used, torch.arange(49152 - (DRAFT_VOCAB - len(used)), 49152)])[:DRAFT_VOCAB]
    tensors = {
        "fc.weight": _w(g, H, 3 * H),
        **_layer(g, prefix, 2 * H),
        f"{prefix}input_layernorm.weight": _norm(g),
        f"{prefix}hidden_norm.weight": _norm(g),
        "norm.weight": _norm(g),
        "lm_head.weight": _w(g, DRAFT_VOCAB, H, scale=0.2),
        "d2t": used - torch.arange(DRAFT_VOCAB),
        "t2d": torch.zeros(49152, dtype=torch.bool).index_fill_(0, used, True),
        **_further(g, layers),
    }
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    if speculators:
        config = {
            "speculators_model_type": "eagle3",
            "architectures": ["Eagle3Speculator"],
            "transformer_layer_config": _config(),
            "draft_vocab_size": DRAFT_VOCAB,
            "norm_before_residual": True,
            "target_hidden_size": H,
        }
    else:
        config = _config(
            architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=DRAFT_VOCAB, num_hidden_layers=layers
        )
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# -- the reference forward, from the papers' description --------------------------------------------------------


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def reference_head(
    t: dict[str, torch.Tensor], p: str, attn_in: torch.Tensor, residual: torch.Tensor, rotary: Any
) -> torch.Tensor:
    """One Llama decoder layer over rows 0..n-1 at positions 0..n-1, causal: attention reads ``attn_in``, its output
    joins ``residual``, then the MLP with its own norm and residual."""
    n = attn_in.shape[0]
    cos, sin = rotary(attn_in[None], torch.arange(n)[None])
    cos, sin = cos[0], sin[0]  # [n, d]
    q = (attn_in @ t[f"{p}self_attn.q_proj.weight"].T).view(n, HEADS, D).transpose(0, 1)
    k = (attn_in @ t[f"{p}self_attn.k_proj.weight"].T).view(n, KV, D).transpose(0, 1)
    v = (attn_in @ t[f"{p}self_attn.v_proj.weight"].T).view(n, KV, D).transpose(0, 1)
    q, k = q * cos + _rotate(q) * sin, k * cos + _rotate(k) * sin
    k, v = k.repeat_interleave(HEADS // KV, 0), v.repeat_interleave(HEADS // KV, 0)
    scores = q @ k.transpose(1, 2) / D**0.5 + torch.full((n, n), float("-inf")).triu(1)
    attn = (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, HEADS * D)
    x = residual + attn @ t[f"{p}self_attn.o_proj.weight"].T
    r = _rms(x, t[f"{p}post_attention_layernorm.weight"])
    mlp = (F.silu(r @ t[f"{p}mlp.gate_proj.weight"].T) * (r @ t[f"{p}mlp.up_proj.weight"].T)) @ t[
        f"{p}mlp.down_proj.weight"
    ].T
    return x + mlp


def reference_further(t: dict[str, torch.Tensor], x: torch.Tensor, rotary: Any) -> torch.Tensor:
    """A head's layers after its first (``layers.1.*`` ..): each a Llama decoder layer with its input norm."""
    i = 1
    while f"layers.{i}.input_layernorm.weight" in t:
        x = reference_head(t, f"layers.{i}.", _rms(x, t[f"layers.{i}.input_layernorm.weight"]), x, rotary)
        i += 1
    return x


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = folder / "model.safetensors"
    return load_file(str(file)) if file.is_file() else torch.load(folder / "pytorch_model.bin", weights_only=True)


def _first_children(draft: Any, ids: list[int], features: torch.Tensor) -> dict[int, float]:
    """The draft's children of the root (the prompt's last token) and their log-probs, given the target's
    features at every prompt position."""
    draft.start(ids)
    draft.prefix_features(0, features)
    tree = TokenTree(ids[-1], len(ids) - 1)
    draft.depth = 1
    draft.propose(tree, ids, budget=64)
    return {tree.node(c).token: tree.node(c).score for c in tree.root.children.values()}


# -- tests ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompt(chat_ids: Callable[[str], list[int]]) -> list[int]:
    return chat_ids(EQUIVALENCE_PROMPTS[0])


def test_eagle1_drafts_what_the_papers_head_drafts_on_transformers_features(
    bundled: Any, tokenizer: Any, reference_model: Any, prompt: list[int], tmp_path: Path
) -> None:
    """EAGLE-1/2 with its one layer, and with a further one (SafeAILab's ``num_hidden_layers`` 2: that layer keeps
    its input norm)."""
    stage = Stage(bundled, 0, bundled.num_layers, weights="fp32")
    stage.forward_prefix(stage.new_cache(), torch.tensor(prompt), range(len(prompt)))
    m = reference_model.model
    with torch.no_grad():
        f = reference_model(torch.tensor([prompt]), output_hidden_states=True).hidden_states[-1][0]  # after the norm
        emb = m.embed_tokens(torch.tensor(prompt[1:]))  # row t: token x_{t+1} with feature f_t, at position t
    for layers in (1, 2):
        folder = write_eagle1(tmp_path / f"eagle1-{layers}", layers=layers)
        draft = build_draft(f"eagle:{folder}", bundled, tokenizer, TreeConfig())
        got = _first_children(draft, prompt, stage.last_hidden)  # ours: the last hidden states before the final norm
        t = _tensors(folder)
        with torch.no_grad():
            x = torch.cat([emb, f[:-1]], -1) @ t["fc.weight"].T + t["fc.bias"]
            out = reference_head(t, "layers.0.", x, x, m.rotary_emb)  # the first layer: no input norm
            out = reference_further(t, out, m.rotary_emb)
            logp = (out[-1] @ reference_model.lm_head.weight.T).log_softmax(-1)  # the target's head, no norm
        top = logp.topk(len(got))
        want = {int(i): float(v) for v, i in zip(top.values, top.indices, strict=True)}
        assert set(got) == set(want), layers
        assert max(abs(got[k] - want[k]) for k in got) < 1e-3, layers


def _torch_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """Heads drafting on torch's operators, as the papers' forward does (on a CPU the drafts run an EAGLE-3 head's
    layer through the native glue, in int8: ``test_eagle3_drafts_...[glue]`` bounds the difference)."""
    from homespec.model.eagle import EagleHead

    monkeypatch.setattr(EagleHead, "use_glue", lambda self: False)


@pytest.mark.parametrize(
    "speculators, glue", [(False, False), (True, False), (False, True)], ids=["eagle3", "speculators", "glue"]
)
def test_eagle3_drafts_what_the_papers_head_drafts_and_its_fc_sums_across_stages(
    bundled: Any,
    tokenizer: Any,
    reference_model: Any,
    prompt: list[int],
    tmp_path: Path,
    speculators: bool,
    glue: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On torch's operators the head's log-probs are the reference's within 1e-3; through the native glue (int8
    products, ``EagleHead.use_glue``; a C compiler here) the same children within 0.02. SafeAILab's layout also
    with two layers (HomeSpec's ``--head-layers 2``: the second a plain decoder layer over the first's output)."""
    from homespec.model.eagle import tap_weights
    from homespec.native import library

    if not glue:
        _torch_ops(monkeypatch)
    elif library() is None:
        pytest.skip("no native glue here (no C compiler)")

    folder = write_eagle3(tmp_path / "eagle3", speculators=speculators)
    t, m, layers = _tensors(folder), reference_model.model, bundled.num_layers
    p = "layers.0." if speculators else "midlayer."
    with torch.no_grad():
        states = reference_model(torch.tensor([prompt]), output_hidden_states=True).hidden_states
        # hidden_states[i]: the residual stream entering layer i (0: the embeddings), as EAGLE-3 reads them
        fused = torch.cat([states[2][0], states[layers // 2][0], states[layers - 3][0]], -1) @ t["fc.weight"].T
    # the split sum: every stage adds its own layers' share of fc into the carry, here over 1, 4 and 7 stages
    for split in ((0, 30), (0, 3, 16, 28, 30), (0, 2, 3, 15, 16, 27, 28, 30)):
        carry = None
        x: torch.Tensor = torch.tensor(prompt)
        for a, b in itertools.pairwise(split):
            stage = Stage(bundled, a, b, weights="fp32", taps=tap_weights(folder, bundled.config, a, b))
            x = stage.forward_prefix(stage.new_cache(), x, range(len(prompt)), carry)
            carry = stage.last_carry
        assert carry is not None and (carry - fused).abs().max() < 2e-3 * fused.abs().max(), split

    two = write_eagle3(tmp_path / "two", layers=2)  # (the same first layer, fc and LM head: the same carry)
    for head in (folder,) if speculators else (folder, two):
        t = _tensors(head)
        draft = build_draft(f"eagle:{head}", bundled, tokenizer, TreeConfig())
        assert draft.feature_taps == (2, 15, 27) and draft.glued == glue
        got = _first_children(draft, prompt, carry)
        with torch.no_grad():
            emb = m.embed_tokens(torch.tensor(prompt[1:]))
            g = fused[:-1]  # row t: token x_{t+1} with the fused feature at t, position t
            hn = _rms(g, t[f"{p}hidden_norm.weight"])
            attn_in = torch.cat([_rms(emb, t[f"{p}input_layernorm.weight"]), hn], -1)
            out = reference_head(t, p, attn_in, hn if speculators else g, m.rotary_emb)
            out = reference_further(t, out, m.rotary_emb)
            logp = (_rms(out[-1], t["norm.weight"]) @ t["lm_head.weight"].T).log_softmax(-1)
        top = logp.topk(len(got))
        columns = torch.arange(DRAFT_VOCAB) + t["d2t"]  # draft id i is the target's token i + d2t[i]
        want = {int(columns[i]): float(v) for v, i in zip(top.values, top.indices, strict=True)}
        assert set(got) == set(want), head.name
        assert max(abs(got[k] - want[k]) for k in got) < (0.02 if glue else 1e-3), head.name


@pytest.mark.slow
@pytest.mark.parametrize("version", [1, 3])
def test_every_mode_is_lossless_with_an_eagle_head(
    version: int, tmp_path: Path, chat_ids: Callable[[str], list[int]], engines: Callable[..., Any]
) -> None:
    from homespec.engine import Engine, EngineOptions

    # (EAGLE-1 with two layers, as SafeAILab's num_hidden_layers allows: the head's cache holds both layers' rows)
    folder = write_eagle1(tmp_path / "eagle1", layers=2) if version == 1 else write_eagle3(tmp_path / "eagle3")
    spec = f"ngram+eagle:{folder}"
    plain = engines("none", weights="int4")
    ids = chat_ids(EQUIVALENCE_PROMPTS[1])
    cfg = GenerationConfig(max_tokens=24)
    sampled = GenerationConfig(max_tokens=24, sampling=SamplingConfig(temperature=0.8, seed=5))
    want = list(plain.generate(ids, cfg))[-1].tokens
    seen: dict[tuple[str, int], torch.Tensor] = {}  # the prompt's features as the head got them, per run
    for mode, stages in (("ar", 1), ("specpipe", 1), ("specpipe", 4), ("tree", 4)):
        engine = Engine(EngineOptions(draft=spec, mode=mode, stages=stages, weights="int4"))
        try:
            draft = engine._drafts[spec]
            told = draft.prefix_features
            draft.prefix_features = lambda a, h, m=mode, s=stages, told=told: (seen.setdefault((m, s), h), told(a, h))
            done = list(engine.generate(ids, cfg))[-1]
            assert isinstance(done, GenerationFinished)
            assert done.tokens == want, f"{mode} S={stages} with EAGLE-{version} diverged"
            assert done.stats.draft_forwards > 0, "the EAGLE head never drafted"
            # every stage count hands the head the same features (EAGLE-3: the fc sum, added up across stages)
            first = seen[("ar", 1)]
            assert (seen[(mode, stages)] - first).abs().max() < 1e-3 * first.abs().max(), f"{mode} S={stages}"
            if (mode, stages) == ("specpipe", 4):  # seeded sampling: our own non-speculative draw, token for token
                drawn = list(engine.generate(ids, sampled))[-1].tokens
                assert drawn == list(plain.generate(ids, sampled))[-1].tokens
        finally:
            engine.close()


def test_bad_eagle_files_get_a_clear_error_naming_the_tensor(bundled: Any, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = write_eagle3(tmp_path / "ok")
    good = load_file(str(folder / "model.safetensors"))

    def broken(name: str, change: dict[str, torch.Tensor | None]) -> Path:
        out = tmp_path / name
        out.mkdir()
        t = {k: v for k, v in {**good, **change}.items() if v is not None}
        save_file({k: v.contiguous() for k, v in t.items()}, str(out / "model.safetensors"))
        (out / "config.json").write_text((folder / "config.json").read_text())
        return out

    with pytest.raises(DraftError, match=r"fc.weight is \[576, 1000\]"):
        load_eagle(broken("fc", {"fc.weight": torch.zeros(576, 1000)}), bundled.config)
    with pytest.raises(DraftError, match=r"no tensor layer\.hidden_norm\.weight"):
        load_eagle(broken("norm", {"midlayer.hidden_norm.weight": None}), bundled.config)
    with pytest.raises(DraftError, match=r"q_proj.weight is \[576, 576\]"):
        load_eagle(broken("q", {"midlayer.self_attn.q_proj.weight": torch.zeros(576, 576)}), bundled.config)
    with pytest.raises(DraftError, match="d2t maps draft ids outside"):
        load_eagle(broken("d2t", {"d2t": torch.full((DRAFT_VOCAB,), 49152)}), bundled.config)
    with pytest.raises(DraftError, match=r"layers \[2\] beside its first: expected layers.1 .. layers.1"):
        load_eagle(broken("gap", {"layers.2.input_layernorm.weight": torch.ones(576)}), bundled.config)
    with pytest.raises(DraftError, match=r"no tensor layers\.1\.self_attn\.q_proj\.weight"):
        load_eagle(broken("half", {"layers.1.input_layernorm.weight": torch.ones(576)}), bundled.config)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(DraftError, match="unreadable"):
        load_eagle(tmp_path / "junk", bundled.config)


def test_an_eagle3_draft_needs_the_stages_to_hold_its_taps(engines: Callable[..., Any], tmp_path: Path) -> None:
    folder = write_eagle3(tmp_path / "eagle3")
    with pytest.raises(DraftError, match="needs the stages to add up its fc"):
        engines("none").build_draft(f"eagle:{folder}")


def test_a_wave_carry_of_the_wrong_shape_is_refused() -> None:
    tokens = RawTensor("int64", (2,), bytes(16))
    ok = Wave(
        1, False, (1,), (2,), (0,), (5, 6), (-1, 5), (3, 4), tokens, carry=RawTensor("float32", (2, 4), bytes(32))
    )
    assert ok.carry.shape == (2, 4)
    with pytest.raises(ValueError, match="carry"):
        Wave(1, False, (1,), (2,), (0,), (5, 6), (-1, 5), (3, 4), tokens, carry=RawTensor("float32", (3, 4), bytes(48)))
    with pytest.raises(ValueError, match="carry"):
        Wave(1, False, (1,), (2,), (0,), (5, 6), (-1, 5), (3, 4), tokens, carry=RawTensor("int64", (2, 4), bytes(64)))


@pytest.mark.slow
def test_an_eagle3_head_from_the_hub_drafts_in_stage_processes_that_fetch_it_too(
    tmp_path: Path, chat_ids: Callable[[str], list[int]], engines: Callable[..., Any]
) -> None:
    """``eagle:owner/name``: the head is fetched into the Hugging Face cache (through the real huggingface_hub code,
    from tests/fake_hub.py), by the head for its layer and by each stage process for its share of fc."""
    import os
    import subprocess

    from tests.fake_hub import FakeHub
    from tests.workers import HOMESPEC

    repo = "someone/eagle3-smollm2"
    hub = FakeHub({repo: write_eagle3(tmp_path / "eagle3")})
    try:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
        prompt = EQUIVALENCE_PROMPTS[2]
        cmd = [HOMESPEC, "generate", prompt, "--mode", "specpipe", "--stages", "2"]
        out = subprocess.run(
            [*cmd, "--draft", f"ngram+eagle:{repo}", "-n", "24", "--json"], env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-3000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        want = list(engines("none", weights="int4").generate(chat_ids(prompt), GenerationConfig(24)))[-1].tokens
        assert tuple(result["tokens"]) == tuple(want)
        assert result["stats"]["draft_forwards"] > 0
        assert {g.split("/", 2)[-1] for g in hub.gets} >= {"config.json", "model.safetensors"}
    finally:
        hub.close()


@pytest.mark.slow
def test_an_eagle3_head_trained_here_reads_the_right_layers_and_drafts_losslessly(
    engines: Callable[..., Any],
    reference_model: Any,
    prompt: list[int],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``train-draft --eagle3``: the data records the streams *entering* layers 2, 15 and 27 (transformers'
    ``hidden_states[i]``, as EAGLE-3's fc reads them); training with the training-time test lowers the loss; the
    head is written in SafeAILab's EAGLE-3 layout without an LM head of its own (``draft_vocab_size`` 0), loads,
    drafts what the papers' forward over the target's own LM head drafts, and keeps ``specpipe`` lossless. Written
    with a draft vocabulary it holds the target's LM head rows for those tokens and the ``d2t`` that maps to them."""
    from homespec.engine import Engine, EngineOptions
    from homespec.model.eagle import eagle_config, read_eagle, tap_weights
    from homespec.model.train_head import TrainConfig, build_data, train

    engine = engines("none")
    taps = (2, 15, 27)
    texts = ["Name three colors of the rainbow.", "Write one sentence about the moon.", EQUIVALENCE_PROMPTS[0]]
    data = build_data(engine, texts, max_new=12, progress=lambda: None, record=taps)
    assert all(f.shape == (len(t), 3 * H) for f, t in zip(data.features, data.tokens, strict=True))
    seq = data.tokens[2]  # the third prompt and its reply: the streams of transformers' forward over it
    with torch.no_grad():
        states = reference_model(seq[None], output_hidden_states=True).hidden_states
    want = torch.cat([states[i][0] for i in taps], -1)
    got = data.features[2].float()
    assert ((got - want).norm(dim=-1) / want.norm(dim=-1)).max() < 0.02  # bf16 storage; another layer is far off
    off_by_one = torch.cat([states[i + 1][0] for i in taps], -1)
    assert ((got - off_by_one).norm(dim=-1) / off_by_one.norm(dim=-1)).median() > 0.1  # (the first token's
    # stream is one huge attention-sink activation that barely changes from layer to layer: the median, not the min)

    log: list[dict[str, float]] = []
    cfg = TrainConfig(epochs=4, lr=1e-3, holdout=0.34, unroll=2, pack=40, taps=taps)
    head = train(engine, data, tmp_path / "run", cfg, log.append)
    assert log[-1]["loss"] < 0.8 * log[0]["loss"], f"loss did not go down: {[m['loss'] for m in log]}"
    folder = head.save(tmp_path / "eagle3", engine.source.config, {"test": True})
    config, tensors = read_eagle(folder)
    assert "midlayer.hidden_norm.weight" in _tensors(folder) and "lm_head.weight" not in tensors
    assert config["draft_vocab_size"] == 0 and config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [2, 15, 27]
    loaded = eagle_config(config, tensors, engine.source.config)
    assert (loaded.version, loaded.taps, loaded.draft_vocab, loaded.layers) == (3, taps, 0, 1)

    # grown to two layers (``--head-layers 2 --init``): it starts as the head it grew from, then its second layer
    # trains; written with ``layers.1.*`` and num_hidden_layers 2, it loads as a head of two layers
    from homespec.model.train_head import _loss, _whole_target, new_eagle3, split

    grown = new_eagle3(engine, taps, layers=2)
    grown.load_tensors(tensors)
    whole, (trained, _) = _whole_target(engine), split(data, cfg)
    with torch.no_grad():
        before, hits = _loss(head, whole, data, trained, cfg, False)
        start, start_hits = _loss(grown, whole, data, trained, cfg, False)
    assert abs(float(start) - float(before)) < 1e-3 * float(before) and start_hits == hits
    went_on: list[dict[str, float]] = []
    train(engine, data, tmp_path / "grown", dataclasses.replace(cfg, head_layers=2), went_on.append, init=grown)
    assert float(grown.w["layers.1.self_attn.o_proj.weight"].abs().max()) > 0
    with torch.no_grad():
        assert float(_loss(grown, whole, data, trained, cfg, False)[0]) < float(before)
    two = load_eagle(grown.save(tmp_path / "two", engine.source.config), engine.source.config)
    assert two.cfg.layers == 2 and json.loads((tmp_path / "two" / "config.json").read_text())["num_hidden_layers"] == 2
    assert "layers.1.mlp.down_proj.weight" in _tensors(tmp_path / "two")

    # it drafts what the papers' EAGLE-3 forward drafts through the target's own norm-free LM head
    _torch_ops(monkeypatch)
    bundled = engine.source
    stage = Stage(bundled, 0, bundled.num_layers, weights="fp32", taps=tap_weights(folder, bundled.config, 0, 30))
    stage.forward_prefix(stage.new_cache(), torch.tensor(prompt), range(len(prompt)))
    draft = build_draft(f"eagle:{folder}", bundled, engine.tokenizer, TreeConfig())
    children = _first_children(draft, prompt, stage.last_carry)
    t, m = {k: v.float() for k, v in _tensors(folder).items()}, reference_model.model
    with torch.no_grad():
        states = reference_model(torch.tensor([prompt]), output_hidden_states=True).hidden_states
        fused = torch.cat([states[i][0] for i in taps], -1) @ t["fc.weight"].T
        emb = m.embed_tokens(torch.tensor(prompt[1:]))
        g = fused[:-1]
        hn = _rms(g, t["midlayer.hidden_norm.weight"])
        attn_in = torch.cat([_rms(emb, t["midlayer.input_layernorm.weight"]), hn], -1)
        out = reference_head(t, "midlayer.", attn_in, g, m.rotary_emb)
        logp = (_rms(out[-1], t["norm.weight"]) @ reference_model.lm_head.weight.T).log_softmax(-1)
    top = logp.topk(len(children))
    assert set(children) == {int(i) for i in top.indices}
    assert max(abs(children[int(i)] - float(v)) for v, i in zip(top.values, top.indices, strict=True)) < 1e-3

    plain = engines("none", weights="int4")
    ids = prompt
    gen = GenerationConfig(max_tokens=24)
    want_tokens = list(plain.generate(ids, gen))[-1].tokens
    with Engine(EngineOptions(draft=f"eagle:{folder}", mode="specpipe", stages=4, weights="int4")) as piped:
        done = list(piped.generate(ids, gen))[-1]
    assert isinstance(done, GenerationFinished) and done.tokens == want_tokens and done.stats.draft_forwards > 0

    # a draft vocabulary: the target's LM head rows for those tokens, and d2t mapping draft id i to them
    vocab = torch.tensor(sorted({*range(3000), *prompt}))
    lm = engines("none").target_stages()[0].head_w
    cut = head.save(tmp_path / "cut", engine.source.config, None, vocab, lm)
    eagle = load_eagle(cut, engine.source.config)
    assert eagle.cfg.draft_vocab == len(vocab) and eagle.columns is not None and torch.equal(eagle.columns, vocab)
    torch.testing.assert_close(eagle.w["lm_head.weight"], lm[vocab].to(torch.float16).float())
    # HomeSpec's own form (``train-draft --eagle3 --draft-vocab K``): the ids only, drafting through the target's
    # rows for them and the prompt's tokens in every mode (it was trained over those tokens alone)
    ours = head.save(tmp_path / "ours", engine.source.config, None, vocab)
    config, tensors = read_eagle(ours)
    assert config["draft_vocab_size"] == 0 and "lm_head.weight" not in tensors
    mine = build_draft(f"eagle:{ours}", engine.source, engine.tokenizer, TreeConfig())
    assert mine.eagle.vocab is not None and torch.equal(mine.eagle.vocab, vocab)
    for mode in ("ar", "specpipe"):
        mine.set_mode(mode)
        mine.start(prompt)
        assert torch.equal(mine.columns, torch.unique(torch.cat([vocab, torch.tensor(prompt)]))), mode

    # training over a draft vocabulary (``DraftVocab``): over every token it is the full loss; over some, a row
    # whose next token is outside them is out of the loss and a miss; training with one lowers the loss too
    from homespec.model.train_head import DraftVocab, _loss, _whole_target

    stage = _whole_target(engine)
    rows, y = [0, 1], torch.cat([data.labels[i][1:] for i in (0, 1)])
    full, hits = _loss(head, stage, data, rows, cfg, False)
    every, every_hits = _loss(head, stage, data, rows, cfg, False, DraftVocab.of(stage, torch.arange(49152)))
    assert abs(float(every) - float(full)) < 1e-4 * float(full) and every_hits == hits
    half = torch.unique(y)[::2]
    _, half_hits = _loss(head, stage, data, rows, cfg, False, DraftVocab.of(stage, half))
    assert half_hits[0][1] == hits[0][1] and half_hits[0][0] <= int(torch.isin(y, half).sum())
    log = []
    train(
        engine, data, tmp_path / "run-vocab", cfg, log.append, vocab=torch.tensor(sorted({*range(3000), *y.tolist()}))
    )
    assert log[-1]["loss"] < 0.8 * log[0]["loss"], f"loss did not go down: {[m['loss'] for m in log]}"


def test_a_shipped_eagle3_head_is_what_eagle_and_auto_draft_with(
    bundled: Any,
    tokenizer: Any,
    chat_ids: Callable[[str], list[int]],
    engines: Callable[..., Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A head folder in ``assets/heads`` whose config names the target (``homespec_target``, as ``train-draft
    --eagle3`` writes it) is what ``eagle`` drafts with and ``auto``'s union arm holds; the engine starts its stages
    with the taps as ``shipped:NAME`` (each machine reads its own copy), and ``auto`` stays lossless with it (an
    engine started without the taps: ``auto`` drafts without that head, and says so once). A name that leaves the
    folder is refused; with none shipped, ``eagle`` says how to train one."""
    import homespec.model.drafts as drafts
    from homespec.backends import eagle3_head
    from homespec.engine import Engine, EngineOptions
    from homespec.model.eagle import eagle_folder
    from homespec.model.head import target_fingerprint

    heads = tmp_path / "heads"
    monkeypatch.setattr(drafts, "SHIPPED_HEADS", heads)
    heads.mkdir()
    assert drafts.shipped_eagle(bundled, required=False) == "" and eagle3_head("auto", bundled) == ""
    with pytest.raises(DraftError, match="no EAGLE-3 head is shipped") as err:
        build_draft("eagle", bundled, tokenizer, TreeConfig())
    assert "train-draft" in (err.value.hint or "")
    folder = write_eagle3(heads / "mine")
    write_eagle3(heads / "another", seed=4)  # no homespec_target: some other target's
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "homespec_target": target_fingerprint(bundled.config)}))

    assert drafts.shipped_eagle(bundled) == "shipped:mine" and eagle_folder("shipped:mine") == folder
    for bad in ("shipped:../heads/mine", "shipped:", "shipped:nothing"):
        with pytest.raises(DraftError, match="is shipped"):
            eagle_folder(bad)
    assert {eagle3_head(d, bundled) for d in ("auto", "eagle", "ngram+eagle")} == {"shipped:mine"}
    assert eagle3_head("ngram+head+recycle", bundled) == ""
    auto = build_draft("auto", bundled, tokenizer, TreeConfig())
    assert list(auto.arms) == ["ngram+recycle", "ngram+eagle+recycle"] and auto.feature_taps == (2, 15, 27)

    ids = chat_ids(EQUIVALENCE_PROMPTS[2])
    cfg = GenerationConfig(max_tokens=24)
    want = list(engines("none").generate(ids, cfg))[-1].tokens
    engine = Engine(EngineOptions(draft="auto", weights="fp32"))
    try:
        assert engine.options.taps == "shipped:mine"
        done = list(engine.generate(ids, cfg))[-1]
        assert isinstance(done, GenerationFinished) and done.tokens == want
        assert engine._drafts["auto"].bases["eagle"].forwards > 0, "the shipped head never drafted"
    finally:
        engine.close()

    # an engine whose stages hold no taps (started with another draft): auto drafts without the EAGLE-3 head rather
    # than failing the request, and says so once
    heard: list[str] = []
    plain = Engine(EngineOptions(draft="none", weights="fp32"), progress=heard.append)
    try:
        assert plain.options.taps == ""
        for _ in range(2):
            plain.fresh_draft("auto")
            done = list(plain.generate(ids, cfg, draft="auto"))[-1]
            assert isinstance(done, GenerationFinished) and done.tokens == want
        fallback = plain._drafts["auto"]
        assert "eagle" not in fallback.bases and list(fallback.arms) == ["ngram+recycle"] and not fallback.feature_taps
        assert [h for h in heard if "shipped:mine's taps" in h] == [heard[-1]], heard
    finally:
        plain.close()
