"""Weight formats: how a stage holds its linear weights, and where quantized ones come from.

A **weight format** (``--weights``) is one of ``fp32``, ``fp16``, ``bf16`` (float tensors in that dtype), ``int4``
or ``int8`` (``model/quant.py``'s types behind the stage's linear calls), or ``auto``:

- a float checkpoint runs in its own dtype (the stage's ``--dtype``); ``int4`` quantizes each linear weight at
  load in groups of 32 (``INT4_GROUP``; ``quant.quantize_int4``: the best of 21 code grids per group, refitted by
  least squares), and ``int8`` per output channel; the embeddings and LM head become int8 in both (they are the
  most sensitive weights and are read one row at a time anyway). Groups of 32 because the only checkpoint here is
  itself 4-bit in groups of 32 (the bundled Q4_1, dequantized), which a coarser group must fit with one grid for
  two: perplexity on tests/data/heldout.txt (256-token windows, transformers fp32 on the dequantized weights) is
  24.43 for the float weights and for groups of 32 (exact), 36.00 in groups of 64 by round-to-nearest and 31.79
  with the fitted grids, 38.18 and 34.29 with groups of 128 (64 where 128 does not divide the 576 inputs). On
  Gemma 3 270M's 5-to-8-bit linears, the nearest to a float checkpoint here (BENCHMARKS.md §6), int8 costs +0.7%
  perplexity and int4 +18% in groups of 32, +45% in groups of 128;
- a GGUF file keeps its own blocks with ``int4`` (Q4_0, Q4_1 and Q4_K are int4 in groups of 32, exactly; Q8_0 is
  int8 per channel, requantized; every other type is dequantized into the activation dtype: see ``quant.from_gguf``),
  read tensor by tensor from the memory-mapped file, so each stage reads only its own tensors. ``int8`` on a GGUF
  is refused (requantizing 4-bit blocks into 8 bits adds error and saves nothing);
- a 4-bit safetensors checkpoint (``quantization_config``: AWQ GEMM, GPTQ without act-order, compressed-tensors
  ``pack-quantized`` W4A16; ``PREQUANTIZED``) runs its own 4-bit weights with ``auto`` or ``int4`` (``quant.from_awq``,
  ``from_gptq``, ``from_compressed_tensors``) and dequantized with a float format; ``int8`` is refused;
- ``auto`` (``resolve_weights``, once per engine, before any stage loads, said in one line where it matters): a
  file whose linears are 4-bit (a GGUF with Q4_0, Q4_1 or Q4_K blocks, or a 4-bit safetensors checkpoint) runs
  ``int4`` where the device has an int4 kernel (the CPU's; CUDA sm80+), else dequantized into ``--dtype``; a float
  checkpoint runs in ``--dtype``. ``--weights fp32`` runs a 4-bit file dequantized: what transformers computes on
  the same weights, which the tests that compare with transformers pin. int4 output is the same in every mode and
  stage count: a quantized stage gives a row the same bits wherever its keys sit and whatever rows ride with it
  (``stage.attention`` in fp64; the products, norms and RoPE are row-wise).

Activations and the KV cache keep ``--dtype`` in every format. A quantized weight's scales are bf16 and its
product runs in bf16 (``KERNEL_DTYPE``: torch's CPU int4 and int8 kernels are fast only there; CUDA's int4 kernel
takes nothing else), the input cast to bf16 and the output cast back to ``--dtype``. The format joins the model
digest stages compare.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from homespec.core.planner import WEIGHT_FORMATS
from homespec.errors import ConfigError, ModelError

if TYPE_CHECKING:
    import torch

    from homespec.model.quant import Weight

FLOAT_FORMATS = ("fp32", "fp16", "bf16")
QUANTIZED_FORMATS = ("int8", "int4")
INT4_GROUP = 32  # int4 groups of a float checkpoint quantized at load (module docstring: 64 and 128 measured worse)
QUANTIZER = "fit21"  # names the quantizer in the cache folder: a changed quantizer never reads an old one's codes


def kernel_dtype() -> torch.dtype:
    """The dtype of quantized weights' scales and products (module docstring)."""
    import torch

    return torch.bfloat16


#: GGUF architectures whose q/k rows llama.cpp's converter permuted (undone on load, as transformers does).
_PERMUTED_QK = ("llama", "mistral")


def int4_kernel_on(device: str) -> bool:
    """Whether torch has an int4 matmul for ``device`` (``quant.Int4Kernel``): the CPU's, CUDA's on sm80+ (not ROCm)."""
    import torch

    if device == "cpu":
        return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    if device.startswith("cuda") and torch.cuda.is_available() and torch.version.hip is None:
        return torch.cuda.get_device_capability(torch.device(device)) >= (8, 0)
    return False


def own_4bit(source: Any) -> str:
    """What makes a model's file 4-bit (``"GGUF Q4_1"``, ``"awq"``), ``""`` for a float one: a GGUF's linears with
    int4 blocks (``quant.GGUF_INT4``), or a safetensors checkpoint's ``quantization_config`` (``PREQUANTIZED``)."""
    if source.prequantized:
        return str(source.prequantized)
    if source.gguf is None:
        return ""
    from homespec.model.quant import GGUF_INT4

    int4 = [k for k in source.gguf_linear_types if k in GGUF_INT4]
    return f"GGUF {'+'.join(int4)}" if int4 else ""


def resolve_weights(source: Any, weights: str, dtype: str, device: str) -> tuple[str, str]:
    """``--weights`` made concrete for ``source`` (``auto`` per the module docstring), and the line that says what
    ``auto`` chose where it matters (``""`` otherwise)."""
    if weights != "auto":
        return weights, ""
    own = own_4bit(source)
    if not own:
        return dtype, ""
    kind = "file's own 4-bit blocks" if source.gguf is not None else "checkpoint's own 4-bit weights"
    if int4_kernel_on(device):
        return "int4", f"weights: int4, the {own} {kind} (--weights {dtype} dequantizes them)"
    return dtype, f"weights: {dtype}, the {own} {kind} dequantized (no int4 kernel on {device})"


def check_format(weights: str, dtype: str) -> None:
    """Refuse an unknown ``--weights``, or a float format other than ``--dtype`` (float weights compute in their
    own dtype)."""
    if weights not in WEIGHT_FORMATS:
        raise ConfigError(f"unknown weight format {weights!r}", hint=f"one of {', '.join(WEIGHT_FORMATS)}")
    if weights in FLOAT_FORMATS and weights != dtype:
        raise ConfigError(
            f"--weights {weights} with --dtype {dtype}: float weights compute in their own dtype",
            hint=f"use --dtype {weights}, or --weights int4 / int8 to keep {dtype} activations over quantized weights",
        )


#: ``quantization_config.quant_method`` values whose 4-bit linears HomeSpec reads, and the tensors of one linear.
PREQUANTIZED = {
    "awq": ("qweight", "qzeros", "scales"),
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "compressed-tensors": ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx"),
}


def prequantized_method(raw: dict[str, Any], where: str) -> str:
    """A checkpoint's 4-bit format from its config (``""``: a float checkpoint); ModelError for a quantization
    HomeSpec cannot run, naming what it can."""
    qc = raw.get("quantization_config")
    if not qc:
        return ""
    method = str(qc.get("quant_method", ""))
    bits = qc.get("bits", qc.get("w_bit"))
    if method == "compressed-tensors":
        schemes = [g.get("weights") or {} for g in (qc.get("config_groups") or {}).values()]
        ok = qc.get("format") == "pack-quantized" and schemes and all(w.get("num_bits") == 4 for w in schemes)
    elif method == "awq":
        ok = bits == 4 and str(qc.get("version", "gemm")).lower() == "gemm"
    elif method == "gptq":
        ok = bits == 4
    else:
        ok = False
    if not ok:
        raise ModelError(
            f"{where}: quantization {method or '?'} ({bits or qc.get('format', '?')}) is not one HomeSpec runs",
            hint="supported: 4-bit AWQ (GEMM), GPTQ without act-order, compressed-tensors pack-quantized W4A16, "
            "GGUF, or a float checkpoint (quantized at load with --weights int4 / int8)",
        )
    return method


def quantize_at_load(name: str, w: torch.Tensor, weights: str, group: int = INT4_GROUP) -> Weight:
    """A float checkpoint's linear weight [out, in] (fp32, on the CPU) in ``weights``: int4 (fitted grids) in
    groups of ``group`` (``INT4_GROUP`` in every stage; benchmarks/int4_groups.py measures others), int8 per
    channel; the embeddings and the LM head int8 in both (module docstring)."""
    from homespec.model.quant import quantize_int4, quantize_int8

    ends = name in ("model.embed_tokens.weight", "lm_head.weight")
    if weights == "int8" or ends:
        return quantize_int8(w, dtype=kernel_dtype())
    if w.shape[1] % group:
        raise ModelError(f"{name}: {w.shape[1]} columns is not a multiple of the int4 group of {group}")
    return quantize_int4(w, group=group, dtype=kernel_dtype())


class QuantCache:
    """Weights quantized at load, kept on disk so that a later load (another stage process, a re-plan, the next
    run) reads 4 or 8 bits instead of quantizing again: ``<cache>/quant/<model digest>-<format>-g<group>/``, one
    safetensors file per tensor (codes, scales; the group in its metadata), written atomically."""

    def __init__(self, digest: str, weights: str) -> None:
        from homespec.config import cache_dir

        self.folder = cache_dir() / "quant" / f"{digest}-{weights}-g{INT4_GROUP}-{QUANTIZER}"

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.safetensors"

    def get(self, name: str) -> Weight | None:
        """The cached weight, or None (absent, or unreadable: then it is quantized again)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from homespec.model.quant import Int4Affine, Int8Channel

        path = self.path(name)
        if not path.is_file():
            return None
        try:
            # fresh allocations: a file's tensors sit at any byte offset, and torch's int8 CPU kernel crashes on a
            # weight that is not 64-byte aligned (a segmentation fault, seen in the suite)
            t = {k: v.clone() for k, v in load_file(str(path)).items()}
            if "scales_and_zeros" in t:
                group = t["codes"].shape[1] * 2 // t["scales_and_zeros"].shape[0]  # in / (in / group)
                return Int4Affine.from_codes(t["codes"], t["scales_and_zeros"], int(group))
            return Int8Channel(t["codes"], t["scales"])
        except (SafetensorError, KeyError, OSError, ModelError) as exc:
            import logging

            logging.getLogger(__name__).warning("ignoring the cached %s (%s): quantizing it again", path, exc)
            return None

    def put(self, name: str, w: Weight) -> None:
        from safetensors.torch import save_file

        from homespec.model.quant import Int4Affine, Int8Channel

        if isinstance(w, Int4Affine):
            tensors = {"codes": w.plain_codes(), "scales_and_zeros": w.scales_and_zeros}
        elif isinstance(w, Int8Channel):
            tensors = {"codes": w.codes, "scales": w.scales}
        else:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.folder)
        os.close(fd)
        try:
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp)
            os.replace(tmp, self.path(name))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def is_linear(name: str) -> bool:
    """Whether a checkpoint tensor is a matrix the stage multiplies by (quantizable), not a norm or a bias."""
    return name.endswith(".weight") and "norm" not in name.rsplit(".", 2)[-2]


class GGUFWeights:
    """A GGUF file's tensors by their transformers names, read one at a time from the memory-mapped file."""

    def __init__(self, path: Path, num_layers: int, heads: int, kv_heads: int) -> None:
        import gguf

        from homespec.model.gguf_file import read_index

        meta, self.tensors = read_index(path)  # raises ModelError("cannot read GGUF …") on a bad file
        self.arch = str(meta.get("general.architecture", ""))
        archs = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
        if self.arch not in archs:
            raise ModelError(f"GGUF {path.name} has architecture {self.arch!r}, which gguf does not know")
        self.path, self.heads, self.kv_heads = path, heads, kv_heads
        self.names = gguf.get_tensor_name_map(archs[self.arch], num_layers)

    def gguf_name(self, name: str) -> str:
        """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight``."""
        base, _, suffix = name.rpartition(".")
        mapped = self.names.get_name(base)
        if mapped is None or f"{mapped}.{suffix}" not in self.tensors:
            raise ModelError(f"tensor {name!r} not found in GGUF {self.path.name}")
        return f"{mapped}.{suffix}"

    def linear_types(self) -> set[str]:
        """The GGML types of the file's matrices (``Q4_1``, ``Q6_K``, ``F32``…)."""
        return {t.tensor_type.name for t in self.tensors.values() if len(t.dims) == 2}

    def read(self, name: str, dtype: torch.dtype, device: str) -> Weight:
        """One tensor in its own format (``quant.from_gguf``), its q/k rows unpermuted where llama.cpp permuted
        them, on ``device``."""
        import torch

        from homespec.model.quant import GGUF_QUANTIZED, from_gguf, llama_qk_order, permute_rows, to_device

        gname = self.gguf_name(name)
        t = self.tensors[gname]
        shape = tuple(reversed(t.dims))  # GGML lists dimensions innermost first
        w: Any
        if len(shape) == 1:
            w = from_gguf(gname, t.tensor_type, t.data, (1, shape[0]), dtype)
            w = (w.dequantize(dtype) if not isinstance(w, torch.Tensor) else w).reshape(shape[0])
        else:
            held = kernel_dtype() if t.tensor_type.name in GGUF_QUANTIZED else dtype
            w = from_gguf(gname, t.tensor_type, t.data, (shape[0], shape[1]), held)
            if self.arch in _PERMUTED_QK and name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = self.heads if name.endswith("q_proj.weight") else self.kv_heads
                w = permute_rows(w, llama_qk_order(heads, shape[0]))
        return to_device(w, device)
