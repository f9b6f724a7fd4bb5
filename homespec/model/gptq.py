"""Data-aware 4-bit quantization of a float checkpoint (``homespec quantize``): GPTQ (Frantar et al., 2022, "GPTQ:
Accurate Post-Training Quantization for Generative Pre-trained Transformers"), written out as a GPTQ checkpoint.

Round-to-nearest quantizes each weight alone. GPTQ quantizes a linear's input columns one at a time and moves each
column's rounding error onto the columns not yet quantized, weighted by the inverse of the Hessian ``H = 2 XᵀX`` of
the layer's squared output error over calibration inputs X, so that ``X Ŵᵀ`` stays close to ``X Wᵀ`` where the
model's activations actually lie. A group's scale and zero are fitted when its first column is reached, on the
columns as the earlier errors left them (``_fit_group``: the integer zero point and a least-squares scale, best of
21 grids), as the published method does with its static groups. Layers are quantized in order, each calibrated on
the outputs of the already quantized layers before it (the paper's sequential mode).

Why a checkpoint folder and not the at-load cache (``formats.QuantCache``): a layer's codes depend on every layer
before it, so no stage can make them from its own tensors alone, and every worker must run bit-identical weights.
The output is a new model with its own digest, in the layout AutoGPTQ publishes (``quant_method: gptq``,
``checkpoint_format: gptq``, 4 bits, ``desc_act: false``, ``sym: false``): qweight int32 [in / 8, out], qzeros int32
[in / group, out / 8] holding zero - 1, scales fp16 [in / group, out]. Every stage reads only its own layers from it
(``quant.from_gptq``), and other GPTQ loaders read it too. Zero points are integers 1..15 in this layout (0 would be
stored as -1, which the 4-bit packing cannot hold); float zeros (``quant.quantize_int4``) would be a little better
but no published layout holds them. The other tensors (norms, biases, embeddings, LM head) are copied unchanged.

The calibration text is the built-in training prompts (``assets/train_prompts.jsonl``, never the bench prompts), or
files the user names; it is cut into windows of ``window`` tokens, each run from a fresh cache.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from homespec.errors import ConfigError, ModelError
from homespec.model.loader import ModelSource
from homespec.model.stage import _LAYER_TENSORS, Stage

CALIBRATION_PROMPTS = Path(__file__).resolve().parents[1] / "assets" / "train_prompts.jsonl"
DAMP = 0.01  # added to H's diagonal, times its mean: the published default
BLOCK = 128  # columns whose errors are applied lazily (the paper's block update)
_GRIDS = 21  # candidate ranges per group: 15 + t / 10 steps across it, t in -10..10


@dataclass(frozen=True)
class GPTQLinear:
    """One linear quantized: w ≈ (codes - zeros) * scales per group of ``group`` input columns."""

    codes: torch.Tensor  # uint8 [out, in], 0..15
    scales: torch.Tensor  # fp16 [out, in / group]
    zeros: torch.Tensor  # uint8 [out, in / group], 1..15
    group: int

    def dequantize(self) -> torch.Tensor:
        """The weight as a stage runs it (fp32 [out, in])."""
        s = self.scales.float().repeat_interleave(self.group, 1)
        z = self.zeros.float().repeat_interleave(self.group, 1)
        return (self.codes.float() - z) * s

    def packed(self) -> dict[str, torch.Tensor]:
        """qweight, qzeros and scales in the GPTQ layout (module docstring)."""
        out, inn = self.codes.shape
        shifts = torch.arange(0, 32, 4, dtype=torch.int64)
        q = self.codes.t().to(torch.int64).reshape(inn // 8, 8, out)  # packed along in, low nibble first
        qweight = (q << shifts[None, :, None]).sum(1)
        width = -(-out // 8) * 8
        z = F.pad(self.zeros.t().to(torch.int64) - 1, (0, width - out))  # [in / group, out padded]; stored z - 1
        qzeros = (z.reshape(-1, width // 8, 8) << shifts).sum(-1)
        return {"qweight": _int32(qweight), "qzeros": _int32(qzeros), "scales": self.scales.t().contiguous()}


def _int32(words: torch.Tensor) -> torch.Tensor:
    """32-bit words held in int64 (0 .. 2³² - 1) as the int32 tensors the layout stores (two's complement)."""
    return torch.where(words < 2**31, words, words - 2**32).to(torch.int32)


def _fit_group(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp16-rounded) and integer zero (1..15) per row of a group's columns w [out, group]: of 21 grids
    spanning the row's range, each with its integer zero and the least-squares scale for its codes, the one with the
    smallest squared error (round-to-nearest over the range is one of them). A constant row gets the grid through
    its value."""
    low = w.amin(1).clamp(max=0.0)  # the grid holds 0 (zero point in range), as GPTQ's min/max quantizer does
    high = w.amax(1).clamp(min=0.0)
    span = (high - low).clamp_min(1e-12)
    best_err = torch.full_like(low, math.inf)
    best_s, best_z = span / 15, torch.ones_like(low)
    for t in range(-(_GRIDS // 2), _GRIDS // 2 + 1):
        s = span / (15 + t / 10)
        z = torch.round(-low / s).clamp(1, 15)
        q = torch.round(w / s[:, None] + z[:, None]).clamp(0, 15) - z[:, None]  # codes minus zero
        qq = (q * q).sum(1)
        fit = torch.where(qq > 0, (q * w).sum(1) / qq.clamp_min(1e-12), s)  # least-squares scale for these codes
        s = torch.where(fit > 0, fit, s).half().float()
        err = ((w - q * s[:, None]) ** 2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s.half().float(), best_z


def gptq_int4(
    w: torch.Tensor, hessian: torch.Tensor, group: int, damp: float = DAMP, act_order: bool = False
) -> GPTQLinear:
    """GPTQ of a float weight [out, in] against ``hessian`` [in, in] (XᵀX over the calibration inputs): the
    column-by-column quantization with error feedback of the module docstring, in float64 for the inverse and
    fp32 for the updates. Input columns that calibration never reached (a zero diagonal) are quantized as zeros.
    ``act_order``: columns in falling order of H's diagonal (the paper's act-order heuristic), with static groups
    (each group's grid fitted before any column moves), so that the layout keeps contiguous groups."""
    out, inn = w.shape
    if inn % group or group % 8 or BLOCK % group:
        raise ConfigError(f"cannot quantize {inn} input columns in groups of {group}", hint="use 32, 64 or 128")
    if hessian.shape != (inn, inn):
        raise ModelError(f"the calibration Hessian is {list(hessian.shape)} for a weight with {inn} inputs")
    W = w.detach().float().clone()
    H = hessian.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    codes = torch.zeros(out, inn, dtype=torch.uint8)
    scales = torch.zeros(out, inn // group)
    zeros = torch.zeros(out, inn // group)
    order = torch.arange(inn)
    if act_order:  # static groups: fitted on the weights as given; columns then taken by falling H diagonal
        for g in range(inn // group):
            scales[:, g], zeros[:, g] = _fit_group(W[:, g * group : (g + 1) * group])
        order = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, order], H[order][:, order]
    H += damp * torch.diag(H).mean() * torch.eye(inn, dtype=H.dtype)
    try:
        inv = torch.cholesky_inverse(torch.linalg.cholesky(H))
        U = torch.linalg.cholesky(inv, upper=True).float()  # the rows of H⁻¹ the paper's update reads
    except RuntimeError as exc:  # torch.linalg.LinAlgError
        raise ModelError(f"the calibration Hessian is not positive definite even damped ({exc})") from exc
    for a in range(0, inn, BLOCK):
        b = min(a + BLOCK, inn)
        W1, U1 = W[:, a:b].clone(), U[a:b, a:b]
        E1 = torch.zeros_like(W1)
        for i in range(b - a):
            col = int(order[a + i])  # the weight's own column
            if act_order:
                s, z = scales[:, col // group], zeros[:, col // group]
            elif col % group == 0:
                s, z = _fit_group(W1[:, i : i + group])
                scales[:, col // group], zeros[:, col // group] = s, z
            q = torch.round(W1[:, i] / s + z).clamp(0, 15)
            codes[:, col] = q.to(torch.uint8)
            err = (W1[:, i] - (q - z) * s) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, b:] -= E1 @ U[a:b, b:]
    return GPTQLinear(codes, scales.half(), zeros.to(torch.uint8), group)


class _Recorder:
    """A float linear weight that adds its inputs' XᵀX to a running Hessian while the stage runs calibration text
    through it (``quant.linear`` calls ``.linear`` on any non-tensor weight)."""

    def __init__(self, w: torch.Tensor) -> None:
        self.w = w
        self.hessian = torch.zeros(w.shape[1], w.shape[1], dtype=torch.float64)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        self.hessian += (rows.t() @ rows).double()  # one window's sum in fp32 (512 rows), the total in fp64
        return F.linear(x, self.w)


def calibration_windows(tokenizer: object, texts: Sequence[str], window: int, max_tokens: int) -> list[list[int]]:
    """The calibration texts, joined by blank lines, tokenized and cut into windows of ``window`` tokens (a BOS at
    the head of each where the model has one, as perplexity does), at most ``max_tokens`` text tokens in all."""
    from homespec.model.perplexity import text_ids

    ids, bos = text_ids(tokenizer, "\n\n".join(texts))
    ids = ids[:max_tokens]
    lead = [] if bos is None else [bos]
    step = window - len(lead)
    wins = [lead + ids[a : a + step] for a in range(0, len(ids), step)]
    wins = [w for w in wins if len(w) >= 2]
    if not wins:
        raise ConfigError("the calibration text is empty")
    return wins


def builtin_calibration() -> list[str]:
    """The built-in calibration texts: every turn of the training prompts (never the bench prompts)."""
    lines = CALIBRATION_PROMPTS.read_text().splitlines()
    return [turn for line in lines if line.strip() for turn in json.loads(line)["turns"]]


@dataclass(frozen=True)
class QuantizeReport:
    folder: Path
    layers: int
    linears: int
    calibration_tokens: int
    group: int


def quantize_checkpoint(
    source: ModelSource,
    out: Path,
    *,
    group: int = 128,
    texts: Sequence[str] | None = None,
    window: int = 512,
    max_tokens: int = 65536,
    act_order: bool = True,
    advance: Callable[[], None] | None = None,
) -> QuantizeReport:
    """Quantize ``source`` (a float checkpoint) with GPTQ, layer by layer (module docstring), into a GPTQ
    checkpoint folder ``out`` (config, tokenizer files and one model.safetensors). ``advance`` hears each layer."""
    from safetensors.torch import save_file

    if source.prequantized:
        raise ModelError(f"{source.name} is already a {source.prequantized} checkpoint", hint="quantize a float one")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty", hint="name a new folder")
    shape = source.shape
    for what, inn in (
        ("hidden", shape.hidden),
        ("attention", shape.heads * shape.head_dim),
        ("MLP", shape.intermediate),
    ):
        if inn % group:
            raise ConfigError(f"{source.name}: {inn} {what} columns do not split into groups of {group}",
                              hint="use --group 32 or 64")  # fmt: skip
    tokenizer = source.tokenizer()
    wins = calibration_windows(tokenizer, list(texts or builtin_calibration()), window, max_tokens)
    calibrated = sum(len(w) for w in wins)
    with torch.inference_mode():
        ends = Stage(source, 0, 0, embed=True, head=False, weights="fp32")
        hidden = [_run(ends, torch.tensor(w)) for w in wins]
    if advance is not None:
        advance()
    tensors: dict[str, torch.Tensor] = {}
    linears = 0
    for i in range(source.num_layers):
        # torch's operators: the recorders below stand in for the layer's weights, which the native glue reads itself
        stage = Stage(source, i, i + 1, embed=False, head=False, weights="fp32", native=False)
        layer = stage.layers[0]
        if layer.moe is not None:
            raise ModelError(f"{source.name}: layer {i} is a mixture of experts, which quantize does not handle yet")
        held = {a: getattr(layer, a) for a in _LAYER_TENSORS if a.startswith("w")}
        recorders = {a: _Recorder(w) for a, w in held.items() if isinstance(w, torch.Tensor)}
        for a, r in recorders.items():
            setattr(layer, a, r)
        with torch.inference_mode():
            for h in hidden:
                _run(stage, h)
        for a, r in recorders.items():
            q = gptq_int4(r.w, r.hessian, group, act_order=act_order)
            setattr(layer, a, q.dequantize())
            base = f"model.layers.{i}.{_LAYER_TENSORS[a].removesuffix('.weight')}"
            tensors.update({f"{base}.{k}": v for k, v in q.packed().items()})
            linears += 1
        with torch.inference_mode():
            hidden = [_run(stage, h) for h in hidden]  # the next layer calibrates on this quantized layer's output
        if advance is not None:
            advance()
    done = {n.removesuffix(".qweight") + ".weight" for n in tensors if n.endswith(".qweight")}
    rest = [n for n in source.weight_map if n not in done]
    tensors.update({n: t.contiguous() for n, t in source.read(rest, None, "cpu").items()})
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": source.name})
    config = dict(source.raw)
    config["quantization_config"] = {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": group,
        "desc_act": False,  # the layout's groups stay contiguous (static groups) even when act_order ran
        "static_groups": act_order,
        "sym": False,
        "checkpoint_format": "gptq",
        "damp_percent": DAMP,
        "true_sequential": False,
        "calibration_tokens": calibrated,
        "quantizer": "homespec quantize",
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(tmp))  # with the chat template a family supplies (``ModelSource.tokenizer``)
    if (source.folder / "generation_config.json").is_file():
        shutil.copy2(source.folder / "generation_config.json", tmp / "generation_config.json")
    if out.exists():
        out.rmdir()  # empty (checked above)
    tmp.rename(out)
    return QuantizeReport(out, source.num_layers, linears, calibrated, group)


def _run(stage: Stage, x: torch.Tensor) -> torch.Tensor:
    """One window through ``stage`` from a fresh cache (token ids or hidden rows in, hidden rows out)."""
    cache = stage.new_cache(max_context=len(x), max_tree=1)
    return stage.forward_prefix(cache, x, range(len(x)))
