"""``homespec quantize``: GPTQ against round-to-nearest on the real model's weights and activations, its GPTQ layout
read back by the loader every stage uses, and the checkpoint it writes run natively and losslessly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from homespec.errors import ConfigError, ModelError
from homespec.model import gptq, quant
from homespec.model.loader import open_folder
from homespec.model.stage import Stage

TEXT = (Path(__file__).parent / "data" / "heldout.txt").read_text()


def _output_error(w: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - Ŵ) H (W - Ŵ)ᵀ): the squared output error over the inputs whose XᵀX is H."""
    d = (w - approx).double()
    return float(torch.einsum("oi,ij,oj->", d, hessian, d))


def test_gptq_beats_round_to_nearest_where_the_real_activations_lie(truncated_copy: Path) -> None:
    """Layer 0 of the real SmolLM2, its real inputs from a text: on every linear the GPTQ weight's output error is
    below both round-to-nearest with the same integer grid (GPTQ given an identity Hessian: no error moves) and the
    at-load quantizer's fitted float-zero grid (``quant.quantize_int4``), at groups of 64, with and without
    act-order."""
    source = open_folder(truncated_copy, "smollm2")
    ids = source.tokenizer()(TEXT, add_special_tokens=False)["input_ids"][:256]
    stage = Stage(source, 0, 1, weights="fp32", native=False)  # the recorders ride torch's operators (gptq.quantize)
    layer = stage.layers[0]
    recorders = {a: gptq._Recorder(getattr(layer, a)) for a in ("wq", "wo", "wg", "wd")}
    for a, r in recorders.items():
        setattr(layer, a, r)
    gptq._run(stage, torch.tensor(ids))
    for a, r in recorders.items():
        w, h = r.w.float(), r.hessian
        assert torch.diag(h).min() > 0, a
        plain = gptq.gptq_int4(w, torch.eye(w.shape[1], dtype=torch.float64), 64)
        at_load = quant.quantize_int4(w, group=64, dtype=torch.float32).dequantize(torch.float32)
        for act_order in (False, True):
            calibrated = gptq.gptq_int4(w, h, 64, act_order=act_order)
            assert int(calibrated.codes.max()) <= 15 and int(calibrated.zeros.min()) >= 1
            assert int(calibrated.zeros.max()) <= 15
            err = _output_error(w, calibrated.dequantize(), h)
            assert err < 0.8 * _output_error(w, plain.dequantize(), h), (a, act_order)
            assert err < 0.8 * _output_error(w, at_load, h), (a, act_order)


@pytest.mark.parametrize(("out", "inn", "group"), [(40, 64, 32), (36, 256, 128)])  # 36: qzeros' last word padded
def test_the_gptq_layout_reads_back_exactly(out: int, inn: int, group: int) -> None:
    """Codes, integer zeros 1..15 (15 fills every bit of a word) and fp16 scales packed as AutoGPTQ does, read by
    ``quant.from_gptq`` (zero stored minus one): the same weight, exactly in fp32."""
    g = torch.Generator().manual_seed(out)
    codes = torch.randint(0, 16, (out, inn), generator=g, dtype=torch.uint8)
    zeros = torch.randint(1, 16, (out, inn // group), generator=g, dtype=torch.uint8)
    zeros[0] = 15
    scales = (torch.rand(out, inn // group, generator=g) / 50 + 1e-3).half()
    q = gptq.GPTQLinear(codes, scales, zeros, group)
    parts = q.packed()
    assert parts["qweight"].dtype == torch.int32 and list(parts["qweight"].shape) == [inn // 8, out]
    assert list(parts["qzeros"].shape) == [inn // group, -(-out // 8)] and parts["scales"].dtype == torch.float16
    back = quant.from_gptq("x", parts["qweight"], parts["qzeros"], parts["scales"], dtype=torch.float32)
    torch.testing.assert_close(back.dequantize(torch.float32), q.dequantize(), rtol=0, atol=1e-6)


def test_gptq_refusals() -> None:
    with pytest.raises(ConfigError, match="groups of 48"):
        gptq.gptq_int4(torch.randn(8, 96), torch.eye(96), 48)
    with pytest.raises(ModelError, match="Hessian is \\[32, 32\\]"):
        gptq.gptq_int4(torch.randn(8, 64), torch.eye(32), 32)


def test_quantize_writes_a_gptq_checkpoint_that_runs_natively_and_losslessly(
    truncated_copy: Path, tmp_path: Path
) -> None:
    """``homespec quantize`` on a real float checkpoint (10 layers of SmolLM2): a GPTQ folder whose linears load as
    int4 in every stage (a stage of one layer reads only that layer), equal to the float model within 4-bit error
    (the logits' top token mostly kept), and greedy ``ar`` and ``specpipe`` S = 2 give the same tokens on it. A
    non-empty target and an already 4-bit source are refused."""
    from typer.testing import CliRunner

    from homespec.cli.main import app
    from homespec.config import GenerationConfig
    from homespec.engine import Engine, EngineOptions
    from homespec.events import GenerationFinished

    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "gptq"
    run = CliRunner().invoke(
        app,
        ["quantize", str(truncated_copy), str(out), "--group", "64", "--calibration", str(calib), "--window", "128"],
    )
    assert run.exit_code == 0, run.output
    assert "70 linears of 10 layers" in run.output and "int4, groups of 64" in run.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["group_size"] == 64 and not qc["desc_act"]
    source = open_folder(out, "gptq")
    assert source.prequantized == "gptq" and "model.layers.3.mlp.down_proj.qweight" in source.weight_map
    one = open_folder(out, "gptq")
    part = Stage(one, 3, 4, embed=False, head=False)
    assert isinstance(part.layers[0].wd, quant.Int4Affine)
    assert one.tensors_read and all(n.startswith("model.layers.3.") for n in one.tensors_read)

    ids = torch.tensor(source.tokenizer()(TEXT, add_special_tokens=False)["input_ids"][:64])
    int4 = Stage(source, 0, 10)
    ref = Stage(open_folder(truncated_copy, "float"), 0, 10, weights="fp32")
    got, want = (s.forward_prefix(s.new_cache(128, 16), ids, range(len(ids))) for s in (int4, ref))
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.6

    config = GenerationConfig(max_tokens=24, stop_on_eos=False)

    def tokens(engine: Engine, ids: list[int]) -> list[int]:
        return list(next(e for e in engine.generate(ids, config) if isinstance(e, GenerationFinished)).tokens)

    with Engine(EngineOptions(model=str(out), split=2, draft="none")) as ar:
        ids = ar.encode("Write two sentences about rivers.")
        want = tokens(ar, ids)
    with Engine(EngineOptions(model=str(out), mode="specpipe", stages=2, draft="ngram")) as pipelined:
        assert pipelined.options.weights == "int4" and tokens(pipelined, ids) == want and len(want) == 24

    again = CliRunner().invoke(app, ["quantize", str(truncated_copy), str(out)])
    assert again.exit_code != 0 and "not empty" in again.output
    twice = CliRunner().invoke(app, ["quantize", str(out), str(tmp_path / "twice")])
    assert twice.exit_code != 0 and "already a gptq checkpoint" in twice.output
