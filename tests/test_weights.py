"""Quantized weights end to end (``--weights``, model/formats.py): the bundled GGUF run on its own Q4_1 blocks, a
float checkpoint quantized at load, their memory and perplexity against fp32, and every mode and stage count giving
the same tokens in int4 (transformers cannot run these weights, so the reference is our own int4 run)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.test_cli import homespec

HELDOUT = Path(__file__).parent / "data" / "heldout.txt"


def _stage(source: Any, a: int, b: int, weights: str) -> Any:
    from homespec.model.stage import Stage

    return Stage(source, a, b, weights=weights)


def test_a_stage_holds_its_own_int4_tensors_in_under_0_3_of_the_fp32_bytes() -> None:
    """``--weights int4`` on the bundled GGUF: Q4_1 layers as int4 (group 32), the Q8_0 embedding as int8; a stage
    of layers 10..19 reads only those layers' tensors from the memory-mapped file."""
    from homespec.model.loader import resolve
    from homespec.model.quant import Int4Affine, Int8Channel

    source = resolve(None)
    assert source.gguf is not None and source.gguf.suffix == ".gguf"
    middle = _stage(source, 10, 20, "int4")
    assert source.tensors_read and {n.split(".")[2] for n in source.tensors_read} == {str(i) for i in range(10, 20)}
    assert all(isinstance(w, Int4Affine) for layer in middle.layers for w in (layer.qkv, layer.gu, layer.wd))
    assert all(layer.wq is None and layer.wg is None for layer in middle.layers)  # stacked (``_Layer.fuse``)
    whole_int4, whole_fp32 = _stage(source, 0, 30, "int4"), _stage(source, 0, 30, "auto")
    assert isinstance(whole_int4.embed_w, Int8Channel) and whole_int4.head_w is whole_int4.embed_w  # tied
    ratio = whole_int4.weight_bytes / whole_fp32.weight_bytes
    assert ratio <= 0.3, f"int4 holds {ratio:.3f} of the fp32 bytes"


def test_the_weight_format_joins_the_digest_stages_compare() -> None:
    from homespec.model.loader import resolve

    source = resolve(None)
    assert len({source.digest(), source.digest("int4"), source.digest("int8")}) == 3
    assert source.digest("auto") == source.digest("fp32") == source.digest()


def _nll(source: Any, weights: str, stages: int = 1) -> float:
    from homespec.core.planner import even_split
    from homespec.model.perplexity import score, text_ids

    parts = [_stage(source, a, b, weights) for a, b in even_split(source.num_layers, stages)]
    ids, bos = text_ids(source.tokenizer(), HELDOUT.read_text())
    return score(parts, ids, window=256, bos=bos).nll


@pytest.mark.slow
def test_perplexity_of_each_format_stays_near_fp32(tmp_path: Path) -> None:
    """On a held-out text: the GGUF's own int4 within 1% of the fp32 run over the same (dequantized) values; a
    float checkpoint quantized at load within 5% (int4, groups of 32) and 1% (int8)."""
    from homespec.model.loader import resolve

    gguf = resolve(None)
    fp32 = math.exp(_nll(gguf, "auto"))
    native = math.exp(_nll(gguf, "int4"))
    assert abs(native / fp32 - 1) < 0.01, (fp32, native)
    folder = tmp_path / "float"  # the same weights as a float safetensors checkpoint
    shutil.copytree(gguf.folder, folder)
    float_source = resolve(str(folder))
    assert float_source.gguf is None
    rtn4, rtn8 = math.exp(_nll(float_source, "int4")), math.exp(_nll(float_source, "int8"))
    assert abs(rtn4 / fp32 - 1) < 0.05, (fp32, rtn4)
    assert abs(rtn8 / fp32 - 1) < 0.01, (fp32, rtn8)
    assert rtn4 != native  # a different quantization (bf16 scales from fp32 weights, int8 ends), really run


@pytest.mark.slow
def test_the_perplexity_command_scores_in_stages_as_in_one() -> None:
    """``homespec perplexity --json`` in 3 stages gives the in-process single-stage NLL exactly (the same math)."""
    from homespec.model.loader import resolve

    out = homespec("perplexity", str(HELDOUT), "--weights", "int4", "--stages", "3", "--window", "256", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["tokens"] > 300 and result["perplexity"] == pytest.approx(math.exp(result["nll"]))
    assert result["nll"] == _nll(resolve(None), "int4")


@pytest.mark.parametrize("native", [True, False])
def test_an_int4_row_gets_the_same_bits_in_any_wave(native: bool) -> None:
    """A quantized stage's logits for a position are bit-identical whether the position is computed in one prefix
    of 40 rows, in a chunk of 10 after 30, or alone (``stage.attention``: fp64 in a quantized stage), through the
    native glue and through torch's operators. Broken on purpose (attention in the activation dtype), the chunk
    differed by 0.31 and the lone row by 0.17."""
    import torch

    from homespec.model.loader import resolve
    from homespec.model.stage import Stage

    stage = Stage(resolve(None), 0, 30, weights="int4", native=native)
    ids = torch.arange(100, 140)

    def logits(*cuts: int) -> torch.Tensor:
        cache, out, a = stage.new_cache(256, 64), [], 0
        for b in (*cuts, 40):
            out.append(stage.forward_prefix(cache, ids[a:b], range(a, b)))
            a = b
        return torch.cat(out)

    whole = logits()
    assert torch.equal(whole, logits(30)) and torch.equal(whole, logits(39)) and torch.equal(whole, logits(7, 33))


def test_bad_weight_requests_get_clear_errors(tmp_path: Path) -> None:
    from homespec.core.messages import Assign
    from homespec.engine import EngineOptions
    from homespec.errors import ConfigError, ModelError
    from homespec.model.formats import GGUFWeights
    from homespec.model.loader import bundled_gguf, resolve

    with pytest.raises(ConfigError, match="unknown weight format 'int3'"):
        EngineOptions(weights="int3")
    with pytest.raises(ConfigError, match="--weights bf16 with --dtype fp32"):
        EngineOptions(weights="bf16")
    with pytest.raises(ValueError, match="weights 'int2'"):
        Assign(0, 1, "", 0, 1, "fp32", "cpu", 64, 8, weights="int2")
    with pytest.raises(ConfigError, match="a GGUF runs its own blocks"):
        _stage(resolve(None), 0, 1, "int8")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(bundled_gguf().read_bytes()[: 5 << 20])
    with pytest.raises(ModelError, match="cannot read GGUF"):
        GGUFWeights(cut, 30, 9, 3)
    out = homespec("perplexity", str(tmp_path / "missing.txt"))
    assert out.returncode == 2 and "text file not found" in out.stderr


def test_plan_sizes_int4_as_stored_and_counts_kv_in_the_activation_dtype() -> None:
    from homespec.core.planner import PlanOptions

    assert PlanOptions(weights="int4", act="bf16").weight_bytes == 0.5 + 2 * 2 / 32
    assert PlanOptions(weights="int4", act="fp32").weight_bytes == 0.5 + 2 * 4 / 32
    assert PlanOptions(weights="int8").weight_bytes == 1.0
    assert PlanOptions(weights="int4", act="fp32").act_bytes == 4.0 and PlanOptions(weights="int4").act_bytes == 2.0


@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_stacked_projections_give_the_bits_of_separate_ones(
    weights: str, truncated_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quantized stage stacks q/k/v and gate/up into one weight each (``_Layer.fuse``): its prefill and its tree
    wave give exactly the logits of a stage that multiplies each part alone, it holds the same bytes, and
    ``_Layer.part`` hands back each part with its own codes (int4: the bundled GGUF's blocks; int8: quantized at
    load from the float copy)."""
    import torch

    from homespec.core.tree import PREFIX_PARENT, WaveRow
    from homespec.model import stage as stage_module
    from homespec.model.loader import open_folder, resolve
    from homespec.model.quant import as_tensor

    monkeypatch.setenv("HOMESPEC_CACHE", str(tmp_path / "cache"))
    source = resolve(None) if weights == "int4" else open_folder(truncated_copy, "float")
    stacked = stage_module.Stage(source, 0, 3, weights=weights, native=False)  # both through torch's operators
    monkeypatch.setattr(stage_module._Layer, "fuse", lambda self, rows: None)
    alone = stage_module.Stage(source, 0, 3, weights=weights, native=False)
    assert all(layer.qkv is not None and layer.gu is not None and layer.wq is None for layer in stacked.layers)
    assert all(layer.qkv is None and layer.wq is not None for layer in alone.layers)
    assert stacked.weight_bytes == alone.weight_bytes
    for name in ("wq", "wk", "wv", "wg", "wu"):
        got = stacked.layers[1].part(name, stacked.part_rows)
        assert got is not None and torch.equal(
            as_tensor(got, torch.float32), as_tensor(getattr(alone.layers[1], name), torch.float32)
        )

    ids = torch.tensor([3, 14, 15, 92, 65, 35, 89, 79])
    rows = [WaveRow(i, i - 1 if i else PREFIX_PARENT, t, 8 + i) for i, t in enumerate((7, 11, 13))]
    outs = []
    for stage in (stacked, alone):
        cache = stage.new_cache(64, 16)
        outs.append(
            (stage.forward_prefix(cache, ids, range(8)), stage.forward_tree(cache, rows, torch.tensor([7, 11, 13])))
        )
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def _prequantized_model(tmp_path: Path, method: str) -> tuple[Path, Path]:
    """A tiny random Llama whose linears are written as a 4-bit ``method`` checkpoint (in the published layout, by
    ``tests/test_quant.py``'s packers), and the same model as a float checkpoint of the exact values HomeSpec runs
    (the 4-bit codes with bf16 scales)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from homespec.model import quant
    from tests.test_quant import minmax_codes, pack_words

    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    packed, exact = {}, dict(state)
    awq = (0, 2, 4, 6, 1, 3, 5, 7)
    for name in [n for n in state if n.startswith("model.layers.") and "proj" in n]:
        q, z, s = minmax_codes(state[name].t().contiguous(), 32)  # [in, out], zeros and scales [in / 32, out]
        base = name.removesuffix(".weight")
        if method == "awq":
            parts = {"qweight": pack_words(q, 1, awq), "qzeros": pack_words(z, 1, awq), "scales": s}
            w = quant.from_awq(name, parts["qweight"], parts["qzeros"], s, torch.bfloat16)
        elif method == "gptq":
            g_idx = torch.arange(q.shape[0], dtype=torch.int32) // 32
            parts = {"qweight": pack_words(q, 0), "qzeros": pack_words(z - 1, 1), "scales": s, "g_idx": g_idx}
            w = quant.from_gptq(name, parts["qweight"], parts["qzeros"], s, g_idx, dtype=torch.bfloat16)
        else:  # compressed-tensors, asymmetric: stored codes and zero points, both offset by 8 from signed
            parts = {"weight_packed": pack_words(q.t().contiguous(), 1), "weight_scale": s.t().contiguous(),
                     "weight_zero_point": pack_words(z.t().contiguous(), 0),
                     "weight_shape": torch.tensor(list(state[name].shape))}  # fmt: skip
            args = [parts[k] for k in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")]
            w = quant.from_compressed_tensors(name, *args, dtype=torch.bfloat16)
        packed.update({f"{base}.{k}": v for k, v in parts.items()})
        del state[name]
        exact[name] = w.dequantize(torch.float32)
    qc = {
        "awq": {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm", "zero_point": True},
        "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False},
        "compressed-tensors": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                               "config_groups": {"group_0": {"weights": {"num_bits": 4, "group_size": 32}}}},
    }[method]  # fmt: skip
    quantized, float_copy = tmp_path / method, tmp_path / f"{method}-float"
    model.save_pretrained(str(float_copy))
    save_file(exact, str(float_copy / "model.safetensors"), metadata={"format": "pt"})
    quantized.mkdir()
    save_file({**state, **packed}, str(quantized / "model.safetensors"), metadata={"format": "pt"})
    raw = json.loads((float_copy / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**raw, "quantization_config": qc}))
    return quantized, float_copy


@pytest.mark.parametrize("method", ["awq", "gptq", "compressed-tensors"])
def test_a_4bit_checkpoint_runs_its_own_weights_and_each_stage_reads_its_own(tmp_path: Path, method: str) -> None:
    """A 4-bit safetensors checkpoint runs as int4 with ``auto``: its logits match the float copy of the same values
    (fp32 stages) within bf16 product rounding, dequantized (``--weights fp32``) they equal them exactly, and a
    stage of layer 1 reads only layer 1's parts."""
    import torch

    from homespec.errors import ConfigError
    from homespec.model.loader import open_folder
    from homespec.model.quant import Int4Affine
    from homespec.model.stage import Stage

    quantized, float_copy = _prequantized_model(tmp_path, method)
    ids = torch.tensor([3, 14, 15, 92, 65, 35, 89, 79])

    def logits(stage: Any) -> torch.Tensor:
        return stage.forward_prefix(stage.new_cache(64, 16), ids, range(8))

    source = open_folder(quantized, method)
    int4 = Stage(source, 0, 2)
    assert isinstance(int4.layers[1].qkv, Int4Affine) and int4.invariant
    want = logits(Stage(open_folder(float_copy, "float"), 0, 2))
    torch.testing.assert_close(logits(int4), want, rtol=0.05, atol=0.05 * float(want.abs().max()))
    assert torch.equal(logits(Stage(open_folder(quantized, method), 0, 2, weights="fp32")), want)
    one = open_folder(quantized, method)
    Stage(one, 1, 2, embed=False, head=False)
    assert one.tensors_read and all(n.startswith("model.layers.1.") for n in one.tensors_read)
    with pytest.raises(ConfigError, match="int8 on a 4-bit"):
        Stage(open_folder(quantized, method), 0, 1, weights="int8")


def test_auto_weights_resolve_per_file_and_device(tmp_path: Path, bundled: Any, truncated_copy: Path) -> None:
    """``--weights auto`` made concrete before any stage loads (``formats.resolve_weights``): a GGUF with int4
    blocks and a 4-bit safetensors checkpoint run int4 where the device has a kernel and dequantized where not, said
    either way; a float checkpoint runs in --dtype silently; a named format is kept."""
    from homespec.model.formats import int4_kernel_on, own_4bit, resolve_weights
    from homespec.model.loader import open_folder

    assert int4_kernel_on("cpu") and not int4_kernel_on("mps")
    assert own_4bit(bundled) == "GGUF Q4_1"
    assert resolve_weights(bundled, "auto", "fp32", "cpu") == (
        "int4",
        "weights: int4, the GGUF Q4_1 file's own 4-bit blocks (--weights fp32 dequantizes them)",
    )
    assert resolve_weights(bundled, "auto", "bf16", "mps") == (
        "bf16",
        "weights: bf16, the GGUF Q4_1 file's own 4-bit blocks dequantized (no int4 kernel on mps)",
    )
    assert resolve_weights(bundled, "fp32", "fp32", "cpu") == ("fp32", "")
    float_folder = open_folder(truncated_copy, "float")
    assert own_4bit(float_folder) == "" and resolve_weights(float_folder, "auto", "bf16", "cpu") == ("bf16", "")
    awq = open_folder(_prequantized_model(tmp_path, "awq")[0], "awq")
    assert resolve_weights(awq, "auto", "fp32", "cpu") == (
        "int4",
        "weights: int4, the awq checkpoint's own 4-bit weights (--weights fp32 dequantizes them)",
    )
    assert resolve_weights(awq, "auto", "fp16", "mps") == (
        "fp16",
        "weights: fp16, the awq checkpoint's own 4-bit weights dequantized (no int4 kernel on mps)",
    )


def test_a_quantization_we_cannot_run_is_named(tmp_path: Path) -> None:
    from homespec.errors import ModelError
    from homespec.model.loader import open_folder

    quantized, _ = _prequantized_model(tmp_path, "awq")
    raw = json.loads((quantized / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match=r"quantization bitsandbytes .* is not one HomeSpec runs"):
        _ = open_folder(quantized, "bnb").prequantized


def test_weights_quantized_at_load_are_cached_and_read_back_bit_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A float checkpoint quantized at load (``--weights int4``) is written to the quantization cache; the next load
    reads the codes back instead of the float tensors, bit-identical; a corrupt cache file is quantized again."""
    import torch

    from homespec.model.loader import open_folder, resolve

    folder = resolve(None).folder  # the bundled model as a float checkpoint
    monkeypatch.setenv("HOMESPEC_CACHE", str(tmp_path / "cache"))
    first_source = open_folder(folder, "float")
    first = _stage(first_source, 2, 4, "int4")
    assert "model.layers.2.self_attn.q_proj.weight" in first_source.tensors_read
    files = sorted((tmp_path / "cache" / "quant").glob("*/*.safetensors"))
    assert len(files) == 14  # 7 linears x 2 layers
    again_source = open_folder(folder, "float")
    again = _stage(again_source, 2, 4, "int4")
    assert not [n for n in again_source.tensors_read if n.endswith("proj.weight")]  # read from the cache
    for a, b in zip(first.layers, again.layers, strict=True):
        assert torch.equal(a.qkv.plain_codes(), b.qkv.plain_codes())
        assert torch.equal(a.wd.scales_and_zeros, b.wd.scales_and_zeros)
    files[0].write_bytes(b"not a safetensors file")
    third_source = open_folder(folder, "float")
    _stage(third_source, 2, 4, "int4")
    assert len([n for n in third_source.tensors_read if n.endswith("proj.weight")]) == 1


def test_prepare_quantizes_a_float_checkpoint_into_the_cache(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from homespec.model.loader import resolve

    folder = resolve(None).folder
    env = {**os.environ, "HOMESPEC_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    exe = str(Path(sys.executable).parent / "homespec")
    out = subprocess.run([exe, "prepare", str(folder), "--weights", "int8"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    files = list((tmp_path / "cache" / "quant").glob("*-int8-*/*.safetensors"))
    assert len(files) == 30 * 7 + 1 and "int8 weights cached in" in out.stdout  # the layers and the tied embedding


def test_a_cached_int8_head_is_aligned_for_the_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read back from the cache, an int8 LM head is a fresh 64-byte-aligned allocation: torch's int8 CPU kernel
    crashed the test process (a segmentation fault) on the file's own unaligned buffer."""
    import torch

    from homespec.model.loader import open_folder, resolve
    from homespec.model.stage import Stage

    folder = resolve(None).folder
    monkeypatch.setenv("HOMESPEC_CACHE", str(tmp_path / "cache"))
    for _ in range(2):  # quantized and cached, then read back
        ends = Stage(open_folder(folder, "float"), 0, 0, embed=True, head=True, weights="int8")
        assert ends.head_w.codes.data_ptr() % 64 == 0
        assert ends.logits(torch.randn(3, 576)).shape == (3, 49152)


def test_a_quantized_row_gets_the_same_bits_wherever_its_keys_sit(bundled: Any, chat_ids: Any) -> None:
    """int4 stages: a token's logits are bit for bit the same computed in a prefill chunk, as the path of a tree wave
    whose ancestors sit in scattered tree slots among decoy siblings (laid out two ways), and one row at a time
    after the path was committed — what keeps ``ar``, ``tree`` and ``specpipe`` token-identical in int4
    (model/stage.py: attention in fp64)."""
    import torch

    from homespec.core.tree import TokenTree
    from homespec.model.stage import Stage

    stage = Stage(bundled, 0, bundled.num_layers, weights="int4")
    prompt = chat_ids("Explain why the sky is blue in two sentences.")
    path = [504, 3101, 314, 253, 1345, 28]  # any tokens: the bits are what is compared
    whole = stage.forward_prefix(stage.new_cache(256, 64), torch.tensor(prompt + path), range(len(prompt) + len(path)))
    want = whole[len(prompt) - 1 :]  # the logits after the last prompt token and after each path token

    def as_tree(decoys_first: bool) -> torch.Tensor:
        cache = stage.new_cache(256, 64)
        stage.forward_prefix(cache, torch.tensor(prompt[:-1]), range(len(prompt) - 1))
        tree = TokenTree(prompt[-1], len(prompt) - 1)
        order, node = [tree.root.id], tree.root.id
        for i, token in enumerate(path):
            decoy, _ = tree.add(node, 9000 + i, 0.0)
            node, _ = tree.add(node, token, 0.0)
            order += [decoy, node] if decoys_first else [node, decoy]
        got = stage.forward_tree(cache, tree.rows(order), torch.tensor([r.token for r in tree.rows(order)]))
        return got[[0, *(order.index(n) for n in order[1:] if tree.path_tokens(n)[-1] in path)]]

    for decoys_first in (False, True):
        assert torch.equal(as_tree(decoys_first), want), f"tree wave (decoys first: {decoys_first})"
    cache = stage.new_cache(256, 64)
    stage.forward_prefix(cache, torch.tensor(prompt[:-1]), range(len(prompt) - 1))
    tokens = [prompt[-1], *path]
    for i, token in enumerate(tokens):  # ar: one row per forward, each committed before the next
        tree = TokenTree(token, len(prompt) - 1 + i, first_id=100 * i)
        rows = tree.rows([tree.root.id])
        got = stage.forward_tree(cache, rows, torch.tensor([token]))
        cache.commit([tree.root.id])
        assert torch.equal(got[0], want[i]), f"one row at a time, token {i}"
