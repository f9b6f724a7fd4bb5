"""Quantized weights a stage can use where it uses a float weight, and converters into them.

A **weight** is ``Weight = Tensor | Int4Affine | Int8Channel``; a stage calls ``linear(x, w, bias)`` and
``embedding(ids, w)`` for all three kinds alike.

- ``Int4Affine``: 4-bit codes ``q`` in 0..15, per group of ``group`` input columns a scale and a zero:
  ``w[o, i] = (q[o, i] - 8) * scale[i // group, o] + zero[i // group, o]``, the formula of torch's int4 matmul
  kernels. Scales and zeros are stored in the activation dtype the weight is built for.
- ``Int8Channel``: int8 codes with one scale per output row: ``w[o, i] = q[o, i] * scale[o]``.

Converters: quantizers from float (``quantize_int4``: fitted grids, ``quantize_int8``: round-to-nearest); GGUF blocks
(``from_gguf``: Q4_0, Q4_1, Q4_K exactly into Int4Affine, Q8_0 requantized into Int8Channel, every other type
gguf can read kept in float); the 4-bit safetensors formats AWQ (``from_awq``), GPTQ (``from_gptq``) and
compressed-tensors pack-quantized (``from_compressed_tensors``).

Bytes held per weight (measured by ``nbytes`` in tests/test_quant.py; ``in``/``group`` columns per scale):
- Int4Affine on CPU or CUDA, as a stage holds its linears (``compact``): 0.5 (the kernel's copy of the codes) +
  2 * dtype bytes / group (bf16, group 32: 0.625; group 128: 0.531). A weight also read by rows (the embeddings, a
  draft vocabulary's LM head rows) keeps its plain codes too: + 0.5. torch's CPU layout interleaves 32 or 64 rows
  depending on the CPU's vector width (AVX512 vs AVX2) and the CUDA layout is tiled, so a compact weight's codes
  are not decoded from the layout: the kernel itself gives them back (``plain_codes``: a product with the identity
  under scale 1 and zero 0, exact), for the rare reads (``dequantize``, ``select_rows``, moving devices).
  Elsewhere (no kernel): 0.5 + scales.
- Int8Channel: 1 + dtype bytes / in.
- Float: 2 (bf16, fp16) or 4 (fp32).

This module computes on tensors; it never opens files (the loader hands it tensors and GGUF blocks) and never
decides which weights to quantize.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from homespec.errors import ModelError

log = logging.getLogger(__name__)

KERNEL_GROUPS = (32, 64, 128, 256)  # group sizes torch's int4 kernels accept (CPU and CUDA)
_CPU_ROW_TILE = 16  # the CPU kernel needs out % 16 == 0: other weights get padded rows in the kernel copy only
_CPU_LAYOUT_BLOCK = 64  # the CPU layout packs rows in independent blocks of 64: such blocks stack as they are
_CPU_PACK_ROWS = 4096  # rows packed per call (a multiple of _CPU_LAYOUT_BLOCK): bounds the int32 copy
_INT8_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 [rows, cols] -> uint8 [rows, cols / 2]: column 2j in the low nibble, 2j + 1 in the high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, cols / 2] (``pack_nibbles``' layout) -> codes 0..15 [rows, cols] uint8."""
    return torch.stack((codes & 15, codes >> 4), dim=-1).reshape(codes.shape[0], -1)


def high_nibble_first(codes: torch.Tensor) -> torch.Tensor:
    """``pack_nibbles``' layout -> the CUDA converter's input: column 2j in the high nibble, 2j + 1 in the low."""
    return ((codes << 4) | (codes >> 4)).contiguous()


# -- the matmul kernels' copy ---------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Int4Kernel:
    """An Int4Affine's codes in the layout of torch's int4 matmul for one device, padded to its row tile."""

    packed: torch.Tensor  # CPU: uint8 [rows, in / 2] (torch's order); CUDA: int32 [rows / 8, in / 16t, 32, t / 2]
    scales_and_zeros: torch.Tensor  # [in / group, rows, 2]: the weight's own tensor when rows == out
    rows: int  # out, rounded up to the kernel's row tile

    def matmul(self, x: torch.Tensor, group: int) -> torch.Tensor:
        """x [n, in] (contiguous, the weight's dtype) -> [n, rows]."""
        if self.packed.device.type == "cpu":
            y: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, group, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm(x, self.packed, group, self.scales_and_zeros)
        return y


def _pad_rows(scales_and_zeros: torch.Tensor, rows: int) -> torch.Tensor:
    """[G, out, 2] -> [G, rows, 2] with zero scales and zeros in the new rows (their outputs are 0 and dropped)."""
    extra = rows - scales_and_zeros.shape[1]
    return scales_and_zeros if extra == 0 else F.pad(scales_and_zeros, (0, 0, 0, extra))


def _cpu_kernel(codes: torch.Tensor, scales_and_zeros: torch.Tensor) -> Int4Kernel:
    out = codes.shape[0]
    rows = -(-out // _CPU_ROW_TILE) * _CPU_ROW_TILE
    parts = []
    for start in range(0, out, _CPU_PACK_ROWS):
        q = unpack_nibbles(codes[start : start + _CPU_PACK_ROWS]).to(torch.int32)  # [chunk, in]
        if start + _CPU_PACK_ROWS >= out and rows > out:
            q = F.pad(q, (0, 0, 0, rows - out), value=8)
        parts.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1))
    return Int4Kernel(torch.cat(parts), _pad_rows(scales_and_zeros, rows), rows)


def _cuda_kernel(codes: torch.Tensor, scales_and_zeros: torch.Tensor) -> Int4Kernel | None:
    """torch's CUDA tinygemm (sm80+, bf16 activations only): its converter takes uint8 [out, in / 2] with column
    2j in the HIGH nibble, and zero-fills the rows up to a multiple of 8."""
    if scales_and_zeros.dtype != torch.bfloat16 or torch.version.hip is not None:
        return None
    if torch.cuda.get_device_capability(codes.device) < (8, 0):
        return None
    in_features = codes.shape[1] * 2
    inner_k_tiles = next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)
    packed: torch.Tensor = torch.ops.aten._convert_weight_to_int4pack(high_nibble_first(codes), inner_k_tiles)
    rows = packed.shape[0] * 8
    return Int4Kernel(packed, _pad_rows(scales_and_zeros, rows), rows)


def _build_kernel(codes: torch.Tensor, scales_and_zeros: torch.Tensor) -> Int4Kernel | None:
    """The kernel copy for the codes' device, or None where there is no kernel (other devices, fp16/fp32 on CUDA,
    an op that is missing or refuses): ``linear`` then dequantizes per call."""
    try:
        if codes.device.type == "cpu":
            return _cpu_kernel(codes, scales_and_zeros)
        if codes.device.type == "cuda":
            return _cuda_kernel(codes, scales_and_zeros)
    except (RuntimeError, NotImplementedError) as exc:
        log.info("no int4 kernel on %s (%s): int4 weights will be dequantized per call", codes.device, exc)
    return None


# -- the weight kinds -----------------------------------------------------------------------------------------


def _rows_of(x: torch.Tensor, in_features: int, what: str) -> torch.Tensor:
    """x [..., in] -> [n, in], checking ``in``."""
    if x.shape[-1] != in_features:
        raise ModelError(f"{what} takes {in_features} input features, got an input of shape {tuple(x.shape)}")
    return x.reshape(-1, in_features)


@dataclass(frozen=True, eq=False)
class Int4Affine:
    """4-bit codes with a scale and a zero per group of input columns: ``w = (q - 8) * scale + zero``.

    Built for one kernel dtype (``scales_and_zeros``' dtype): ``linear`` runs torch's int4 kernel on the weight's
    device (CPU: fp32, bf16, fp16; CUDA sm80+: bf16), an input of another dtype cast to it and the output cast
    back, and dequantizes per call where there is no kernel (correct, slower). On CPU the kernel is fast only in
    bf16 (fp32 and fp16 take a scalar loop: 1.7 ms against 0.05 ms for one row of a 1536 x 576 weight), so the
    stage builds bf16 weights for fp32 activations too (``model/formats.py``). Build with ``from_codes`` (which
    makes the kernel copy) or a converter.
    """

    codes: torch.Tensor | None  # [out, in / 2] uint8: column 2j in the low nibble, 2j + 1 in the high; None:
    # dropped by ``compact`` (the kernel copy holds them)
    scales_and_zeros: torch.Tensor  # [in / group, out, 2]: (scale, zero) in the activation dtype
    group: int
    out_features: int
    in_features: int
    kernel: Int4Kernel | None = None  # None: no kernel for this device and dtype

    def __post_init__(self) -> None:
        out, inn, group = self.out_features, self.in_features, self.group
        if self.codes is None:
            if self.kernel is None:
                raise ModelError("an int4 weight without plain codes needs its kernel copy")
            return
        if group not in KERNEL_GROUPS or inn % group:
            raise ModelError(
                f"int4 group size {group} does not fit {inn} input features",
                hint=f"the int4 kernels take groups of {', '.join(map(str, KERNEL_GROUPS))} dividing the input size",
            )
        if self.codes.dtype != torch.uint8 or tuple(self.codes.shape) != (out, inn // 2):
            raise ModelError(
                f"int4 codes must be uint8 [{out}, {inn // 2}], got {self.codes.dtype} {_shape(self.codes)}"
            )
        sz = self.scales_and_zeros
        if not sz.is_floating_point() or tuple(sz.shape) != (inn // group, out, 2):
            raise ModelError(f"int4 scales_and_zeros must be float [{inn // group}, {out}, 2], got {_shape(sz)}")

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales_and_zeros: torch.Tensor, group: int) -> Int4Affine:
        """A weight from packed codes [out, in / 2] and scales_and_zeros [in / group, out, 2], with its kernel copy."""
        codes, scales_and_zeros = codes.contiguous(), scales_and_zeros.contiguous()
        checked = cls(codes, scales_and_zeros, group, codes.shape[0], codes.shape[1] * 2)
        return dataclasses.replace(checked, kernel=_build_kernel(codes, scales_and_zeros))

    def compact(self) -> Int4Affine:
        """This weight without its plain codes where a kernel copy holds them (a stage's linears: 0.5 bytes per
        weight less); reads by rows then decode them from the kernel (``plain_codes``)."""
        return self if self.kernel is None or self.codes is None else dataclasses.replace(self, codes=None)

    def plain_codes(self) -> torch.Tensor:
        """The codes [out, in / 2] in ``pack_nibbles``' layout: the stored ones, or those of the kernel copy, read
        through the kernel itself: identity rows times the weight under scale 1 and zero 0 give q - 8 exactly
        (small integers are exact in every dtype), whatever the device's packed layout."""
        if self.codes is not None:
            return self.codes
        k = self.kernel
        assert k is not None  # __post_init__
        inn, device = self.in_features, k.packed.device
        unit = torch.zeros_like(k.scales_and_zeros)
        unit[..., 0] = 1
        unit_kernel = Int4Kernel(k.packed, unit, k.rows)
        parts = []
        for start in range(0, inn, 512):  # identity rows in blocks: the product is [block, rows]
            eye = torch.eye(inn, dtype=self.dtype, device=device)[start : start + 512].contiguous()
            parts.append(unit_kernel.matmul(eye, self.group)[:, : self.out_features].float())
        q = torch.cat(parts).t().round() + 8  # [out, in]
        return pack_nibbles(q.clamp(0, 15))

    @property
    def dtype(self) -> torch.dtype:
        return self.scales_and_zeros.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held: codes (unless compact), scales and zeros, and the kernel copy."""
        held = (0 if self.codes is None else _nbytes(self.codes)) + _nbytes(self.scales_and_zeros)
        if self.kernel is not None:
            held += _nbytes(self.kernel.packed)
            if self.kernel.scales_and_zeros is not self.scales_and_zeros:
                held += _nbytes(self.kernel.scales_and_zeros)
        return held

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> x @ w.T [..., out] in x's dtype (no bias)."""
        x2 = _rows_of(x, self.in_features, "this int4 weight")
        k = self.kernel
        if x2.shape[0] == 0:
            y = x2.new_zeros(0, self.out_features)
        elif k is None or x.device != k.packed.device:
            y = F.linear(x2, self.dequantize(x.dtype))
        else:
            y = k.matmul(x2.to(self.dtype).contiguous(), self.group).to(x.dtype)
            if k.rows != self.out_features:
                y = y[:, : self.out_features].contiguous()
        return y.view(*x.shape[:-1], self.out_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out, in] as the kernel computes it: (q - 8) * scale + zero in fp32 from the stored scales
        and zeros, cast to ``dtype`` (default: the activation dtype)."""
        return self._values(self.plain_codes(), self.scales_and_zeros).to(dtype or self.dtype)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` [k] of the dequantized weight -> [k, in] in the activation dtype (an embedding lookup),
        dequantizing only those rows."""
        codes = self.plain_codes()
        idx = index.reshape(-1).to(device=codes.device, dtype=torch.long)
        return self._values(codes[idx], self.scales_and_zeros[:, idx]).to(self.dtype)

    def select_rows(self, index: torch.Tensor) -> Int4Affine:
        """A weight of only output rows ``index`` [k], in that order (a draft vocabulary's LM head rows)."""
        codes = self.plain_codes()
        idx = index.reshape(-1).to(device=codes.device, dtype=torch.long)
        return Int4Affine.from_codes(codes[idx], self.scales_and_zeros[:, idx], self.group)

    def _values(self, codes: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
        """codes [k, in / 2], scales_and_zeros [G, k, 2] -> fp32 [k, in]."""
        k = codes.shape[0]
        q = unpack_nibbles(codes).view(k, -1, self.group).float()  # [k, G, group]
        sz = scales_and_zeros.float().permute(1, 0, 2)  # [k, G, 2]
        return ((q - 8) * sz[..., :1] + sz[..., 1:]).view(k, self.in_features)


@dataclass(frozen=True, eq=False)
class Int8Channel:
    """int8 codes with one scale per output row: ``w = q * scale``, the scale in the activation dtype.

    ``linear`` runs torch's int8 kernel on CPU in the weight's dtype (an input of another dtype cast to it and the
    output cast back: like int4, the kernel is fast only in bf16 here); elsewhere it multiplies by the codes cast to
    x's dtype (int8 is exact in bf16, fp16 and fp32) and scales the output.
    """

    codes: torch.Tensor  # [out, in] int8
    scales: torch.Tensor  # [out] activation dtype

    def __post_init__(self) -> None:
        if self.codes.dtype != torch.int8 or self.codes.dim() != 2:
            raise ModelError(f"int8 codes must be a 2-D int8 tensor, got {self.codes.dtype} {_shape(self.codes)}")
        out = self.codes.shape[0]
        if not self.scales.is_floating_point() or tuple(self.scales.shape) != (out,):
            raise ModelError(f"int8 scales must be float [{out}], got {self.scales.dtype} {_shape(self.scales)}")

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.codes.shape[1])

    @property
    def nbytes(self) -> int:
        return _nbytes(self.codes) + _nbytes(self.scales)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> x @ w.T [..., out] in x's dtype (no bias)."""
        x2 = _rows_of(x, self.in_features, "this int8 weight")
        if x2.device.type == "cpu" and self.dtype in _INT8_CPU_DTYPES and x2.shape[0]:
            xk = x2.to(self.dtype).contiguous()
            y: torch.Tensor = torch.ops.aten._weight_int8pack_mm(xk, self.codes, self.scales).to(x.dtype)
        else:
            y = F.linear(x2, self.codes.to(x.dtype)) * self.scales.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out, in]: q * scale in fp32, cast to ``dtype`` (default: the activation dtype)."""
        return (self.codes.float() * self.scales.float()[:, None]).to(dtype or self.dtype)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` [k] of the dequantized weight -> [k, in] in the activation dtype."""
        idx = index.reshape(-1).to(device=self.codes.device, dtype=torch.long)
        return (self.codes[idx].float() * self.scales[idx].float()[:, None]).to(self.dtype)

    def select_rows(self, index: torch.Tensor) -> Int8Channel:
        """A weight of only output rows ``index`` [k], in that order."""
        idx = index.reshape(-1).to(device=self.codes.device, dtype=torch.long)
        return Int8Channel(self.codes[idx].contiguous(), self.scales[idx].contiguous())


Weight: TypeAlias = torch.Tensor | Int4Affine | Int8Channel


def _nbytes(t: torch.Tensor) -> int:
    return t.nelement() * t.element_size()


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] -> x @ w.T + bias [..., out] for any weight kind (a float weight goes to ``F.linear``)."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    y = w.linear(x)
    return y if bias is None else y + bias


def bf16_kernel(w: Weight) -> bool:
    """Whether ``w`` multiplies through a torch CPU kernel with bf16 input and output (``bf16_product``)."""
    if isinstance(w, Int4Affine):
        k = w.kernel
        return k is not None and k.packed.device.type == "cpu" and w.dtype == torch.bfloat16
    if isinstance(w, Int8Channel):
        return w.codes.device.type == "cpu" and w.dtype == torch.bfloat16
    return False


def bf16_product(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """x bf16 [n, in] (contiguous) @ w.T -> bf16 [n, out] (contiguous), for a weight with ``bf16_kernel``: the
    product ``linear`` computes, without its casts (the native decode glue reads and writes bf16 itself)."""
    if isinstance(w, Int4Affine):
        k = w.kernel
        assert k is not None
        y = k.matmul(x, w.group)
        return y if k.rows == w.out_features else y[:, : w.out_features].contiguous()
    assert isinstance(w, Int8Channel)
    out: torch.Tensor = torch.ops.aten._weight_int8pack_mm(x, w.codes, w.scales)
    return out


def embedding(ids: torch.Tensor, w: Weight) -> torch.Tensor:
    """Token ids [...] -> rows of ``w`` [..., in] (``F.embedding`` for a float weight)."""
    if isinstance(w, torch.Tensor):
        return F.embedding(ids, w)
    return w.rows(ids).view(*ids.shape, w.in_features)


def to_device(w: Weight, device: str) -> Weight:
    """The weight on ``device`` (a quantized one with its kernel copy rebuilt there)."""
    if isinstance(w, torch.Tensor):
        return w.to(device)
    if isinstance(w, Int8Channel):
        return Int8Channel(w.codes.to(device), w.scales.to(device))
    if w.scales_and_zeros.device == torch.device(device):
        return w
    moved = Int4Affine.from_codes(w.plain_codes().to(device), w.scales_and_zeros.to(device), w.group)
    return moved if w.codes is not None else moved.compact()


def compact(w: Weight) -> Weight:
    """The weight as a stage holds a linear it never reads by rows (``Int4Affine.compact``)."""
    return w.compact() if isinstance(w, Int4Affine) else w


def as_tensor(w: Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A float tensor of the weight's values (a quantized weight dequantized), in ``dtype`` when given."""
    t = w if isinstance(w, torch.Tensor) else w.dequantize(dtype)
    return t if dtype is None else t.to(dtype)


def out_features(w: Weight) -> int:
    return int(w.shape[0]) if isinstance(w, torch.Tensor) else w.out_features


def select_rows(w: Weight, index: torch.Tensor) -> Weight:
    """Output rows ``index`` [k] of ``w``, in that order (a draft vocabulary's LM head rows)."""
    return w.index_select(0, index) if isinstance(w, torch.Tensor) else w.select_rows(index)


def weight_nbytes(w: Weight) -> int:
    """Bytes a weight holds (for a quantized weight: codes, scales and the kernel's copy)."""
    return _nbytes(w) if isinstance(w, torch.Tensor) else w.nbytes


def split_rows(w: Weight, sizes: list[int], name: str) -> list[Weight]:
    """A fused weight's output rows split into consecutive parts of ``sizes`` rows (Phi-3's qkv and gate/up), each
    exact and of the same kind; a size mismatch is a ModelError naming the tensor."""
    if sum(sizes) != out_features(w):
        raise ModelError(f"{name} has {out_features(w)} rows, its parts need {' + '.join(map(str, sizes))}")
    if isinstance(w, torch.Tensor):
        return [part.contiguous() for part in torch.split(w, sizes, dim=0)]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    device = _device(w)
    return [w.select_rows(torch.arange(a, a + n, device=device)) for a, n in zip(starts, sizes, strict=True)]


def fuse_rows(parts: Sequence[Weight]) -> Weight | None:
    """Quantized weights of one input stacked into one (q/k/v, gate/up): one kernel call per layer input instead of
    one per part (BENCHMARKS.md §6), each output row computed as it was alone. None where the parts are float (the
    tests that compare with transformers pin float weights, multiplied part by part as it does) or of mixed kinds,
    groups, dtypes or devices."""
    int4 = [p for p in parts if isinstance(p, Int4Affine)]
    if len(int4) == len(parts):
        return _stack_int4(int4)
    int8 = [p for p in parts if isinstance(p, Int8Channel)]
    if len(int8) == len(parts) and len({p.dtype for p in int8}) == 1:
        return Int8Channel(torch.cat([p.codes for p in int8]), torch.cat([p.scales for p in int8]))
    return None


def _stack_int4(parts: list[Int4Affine]) -> Int4Affine | None:
    """``fuse_rows`` for int4 parts of one group, dtype and device, each with its kernel. On the CPU, parts whose
    kernel copies are whole 64-row blocks stack those copies as they are (``_cpu_kernel`` packs in chunks the same
    way); otherwise the codes are read back and packed again (slower: start-up)."""
    first = parts[0]
    kernels = [p.kernel for p in parts if p.kernel is not None]
    alike = all(p.group == first.group and p.dtype == first.dtype for p in parts)
    if len(kernels) != len(parts) or not alike or len({_device(p) for p in parts}) != 1:
        return None
    sz = torch.cat([p.scales_and_zeros for p in parts], dim=1)
    out = sum(p.out_features for p in parts)
    whole_blocks = all(
        k.rows == p.out_features and p.out_features % _CPU_LAYOUT_BLOCK == 0
        for k, p in zip(kernels, parts, strict=True)
    )
    if _device(first).type == "cpu" and whole_blocks:
        packed = torch.cat([k.packed for k in kernels])
        return Int4Affine(None, sz, first.group, out, first.in_features, Int4Kernel(packed, sz, out))
    return Int4Affine.from_codes(torch.cat([p.plain_codes() for p in parts]), sz, first.group).compact()


def _device(w: Int4Affine | Int8Channel) -> torch.device:
    return w.codes.device if isinstance(w, Int8Channel) else w.scales_and_zeros.device


def permute_rows(w: Weight, order: torch.Tensor) -> Weight:
    """The weight with output rows reordered: row r of the result is row ``order[r]`` of ``w`` (exact)."""
    out, device = (int(w.shape[0]), w.device) if isinstance(w, torch.Tensor) else (w.out_features, _device(w))
    idx = order.reshape(-1).to(device=device, dtype=torch.long)
    if idx.numel() != out or not torch.equal(idx.sort().values, torch.arange(out, device=idx.device)):
        raise ModelError(f"a row order for {out} rows must be a permutation of 0..{out - 1}, got {idx.numel()} entries")
    return w[idx] if isinstance(w, torch.Tensor) else w.select_rows(idx)


def llama_qk_order(n_head: int, out: int) -> torch.Tensor:
    """The row order [out] that undoes llama.cpp's rotary permutation of a Q or K projection in a Llama GGUF
    (``n_head``: attention heads for Q, KV heads for K): ``hf = permute_rows(gguf, llama_qk_order(n_head, out))``.

    llama.cpp's converter writes ``hf.reshape(n_head, 2, d, in).swapaxes(1, 2)`` with d = out / n_head / 2, which
    interleaves each head's two rotary halves; this gathers them back."""
    if n_head <= 0 or out % (2 * n_head):
        raise ModelError(f"{out} Q/K rows do not split into {n_head} heads of two rotary halves")
    return torch.arange(out).view(n_head, out // n_head // 2, 2).transpose(1, 2).reshape(-1)


# -- quantizers from float -------------------------------------------------------------------------------------


def quantize_int4(
    w: torch.Tensor, group: int = 128, dtype: torch.dtype | None = None, search: bool = True
) -> Int4Affine:
    """Asymmetric 4-bit quantization of a float weight [out, in], per group of ``group`` input columns.

    ``search=False``: round-to-nearest over the group's range, scale = (max - min) / 15. ``search=True`` (the
    default; llama.cpp's ``make_qkx2_quants`` idea): codes are rounded on 21 grids around that range (15 + t steps
    across it, t in -1..1), each grid's scale and offset refitted to its codes by least squares, and the grid with
    the smallest squared error kept per group: never worse than round-to-nearest (t = 0 is one of the grids, and
    its refit only lowers the error), much better on groups with an outlier. Scale and zero (zero = offset + 8 *
    scale) are stored in ``dtype`` (default: w's) and the codes rounded again against the stored values.
    Deterministic: the same input gives bit-identical output. A constant group gets scale 0 and zero = its value."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ModelError(f"quantize_int4 takes a float [out, in] weight, got {w.dtype} {_shape(w)}")
    out, inn = w.shape
    if group not in KERNEL_GROUPS or inn % group:
        raise ModelError(
            f"cannot quantize {inn} input features in groups of {group}",
            hint=f"use a group of {', '.join(map(str, KERNEL_GROUPS))} that divides {inn}",
        )
    dtype = dtype or w.dtype
    wf = w.float().view(out, inn // group, group)
    low, high = wf.amin(-1, keepdim=True), wf.amax(-1, keepdim=True)  # [out, G, 1]
    scale, offset = (high - low) / 15, low
    if search:
        scale, offset = _fit_grid(wf, low, high, scale, offset)
    scale_s = scale.squeeze(-1).to(dtype)
    zero_s = (offset.squeeze(-1) + 8 * scale_s.float()).to(dtype)
    sc, z = scale_s.float()[..., None], zero_s.float()[..., None]
    q = torch.where(sc == 0, 8.0, torch.round((wf - z) / torch.where(sc == 0, 1.0, sc)) + 8).clamp(0, 15)
    sz = torch.stack((scale_s.t(), zero_s.t()), dim=-1).contiguous()  # [G, out, 2]
    return Int4Affine.from_codes(pack_nibbles(q.view(out, inn)), sz, group)


def _fit_grid(
    wf: torch.Tensor, low: torch.Tensor, high: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_int4``'s search: per group [out, G, group] the (scale, offset) of the least-squares refit of the
    best of 21 code grids, starting from round-to-nearest's (kept where nothing beats it, or the range is 0)."""
    n = wf.shape[-1]
    span = high - low
    best_err = ((wf - (torch.round((wf - offset) / scale.clamp_min(1e-30)).clamp(0, 15) * scale + offset)) ** 2).sum(
        -1, keepdim=True
    )
    sum_x = wf.sum(-1, keepdim=True)
    for step in range(-10, 11):
        inv = (15 + step / 10) / span.clamp_min(1e-30)
        codes = torch.round((wf - low) * inv).clamp(0, 15)
        sum_l, sum_ll, sum_lx = (
            codes.sum(-1, keepdim=True),
            (codes * codes).sum(-1, keepdim=True),
            (codes * wf).sum(-1, keepdim=True),
        )
        det = n * sum_ll - sum_l * sum_l
        ok = det > 0
        a = torch.where(ok, (n * sum_lx - sum_l * sum_x) / torch.where(ok, det, 1.0), scale)
        b = torch.where(ok, (sum_x - a * sum_l) / n, offset)
        ok = ok & (a > 0)
        err = ((wf - (codes * a + b)) ** 2).sum(-1, keepdim=True)
        better = ok & (err < best_err)
        best_err = torch.where(better, err, best_err)
        scale, offset = torch.where(better, a, scale), torch.where(better, b, offset)
    keep = span > 0
    return torch.where(keep, scale, 0.0), torch.where(keep, offset, low)


def quantize_int8(w: torch.Tensor, dtype: torch.dtype | None = None) -> Int8Channel:
    """Symmetric 8-bit round-to-nearest of a float weight [out, in], one scale per output row: scale = max|w| / 127
    stored in ``dtype`` (default: w's), codes round(w / stored scale) clamped to -127..127. Deterministic."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ModelError(f"quantize_int8 takes a float [out, in] weight, got {w.dtype} {_shape(w)}")
    dtype = dtype or w.dtype
    wf = w.float()
    scale = (wf.abs().amax(1) / 127).to(dtype)  # [out]
    s = scale.float()[:, None]
    q = torch.round(wf / torch.where(s == 0, 1.0, s)).clamp(-127, 127).to(torch.int8)
    return Int8Channel(q, scale)


def glue_int8(*parts: torch.Tensor) -> Int8Channel:
    """One product's weights as the native glue takes a draft head's (``DraftHead.use_glue``, ``EagleHead.use_glue``):
    ``parts`` [out_i, in] stacked by output rows, int8 with one bf16 scale per output row (``quantize_int8``)."""
    return quantize_int8(torch.cat([p.detach().float() for p in parts]).contiguous(), torch.bfloat16)


# -- the formats' shared step ---------------------------------------------------------------------------------


def _kernel_group(name: str, group: int, in_features: int) -> int:
    """The largest kernel group that divides ``group`` (a coarser group is the same weight with repeated scales)."""
    if group > 0 and in_features % group == 0:
        for g in reversed(KERNEL_GROUPS):
            if group % g == 0:
                return g
    raise ModelError(
        f"{name}: groups of {group} input columns ({in_features} in all) cannot run on the int4 kernels",
        hint=f"the kernels take groups of {', '.join(map(str, KERNEL_GROUPS))} (or a multiple of 32 that divides in)",
    )


def _as_int4(
    name: str, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int, dtype: torch.dtype
) -> Int4Affine:
    """codes q [out, in] (0..15) with fp32 scale and zero [in / group, out]: w = (q - 8) * scale + zero."""
    g = _kernel_group(name, group, q.shape[1])
    if g != group:
        scale, zero = scale.repeat_interleave(group // g, 0), zero.repeat_interleave(group // g, 0)
    sz = torch.stack((scale, zero), dim=-1).to(dtype).contiguous()  # [in / g, out, 2]
    return Int4Affine.from_codes(pack_nibbles(q), sz, g)


# -- GGUF -----------------------------------------------------------------------------------------------------

Blocks: TypeAlias = npt.NDArray[np.uint8]  # [out, blocks per row, bytes per block]


def from_gguf(name: str, ggml_type: int, raw: npt.NDArray[Any], shape: tuple[int, int], dtype: torch.dtype) -> Weight:
    """A GGUF tensor's data as a weight of HF shape (out, in) for activations of ``dtype``.

    ``raw``: the tensor's bytes as ``gguf_file.read_index`` and ``gguf.GGUFReader`` give them (``data``: uint8
    [out, bytes per row] for quantized types, the float array for F32/F16; any array is read as its bytes).
    ``shape`` is in HF order (out, in): the file's dimensions are GGML order [in, out], reversed.

    - Q4_0 (w = (q - 8) d) -> Int4Affine, group 32: exact in fp32 and fp16 (bf16 rounds d to 8 bits).
    - Q4_1 (w = q d + m) -> Int4Affine, group 32, zero = m + 8 d computed in fp32: exact there whenever m + 8 d is
      (the exponents of m and 8 d within 13 bits of each other), and then bit-identical to gguf's dequantization.
    - Q4_K (w = d sc_j q - dmin m_j, eight sub-blocks of 32) -> Int4Affine, group 32, scale = d sc_j (exact in
      fp32), zero = 8 d sc_j - dmin m_j (one fp32 rounding): within one fp32 rounding of gguf's values.
    - Q8_0 (w = d q per 32 values) -> Int8Channel: the exact values requantized with one scale per row (the int8
      kernel has no block scales): error at most half a row scale, i.e. max|row| / 254; measured on the bundled
      SmolLM2 token_embd: max |error| / max|row| = 0.0039 (fp32 scales).
    - Q8_K (w = d q, fp32 d per 256) and every type ``gguf.quants.dequantize`` reads (Q5_0, Q5_1, Q2_K..Q6_K,
      IQ*, F16, BF16, F32, ...) -> a float tensor in ``dtype``: kept in float, their exact values.
    Anything else, a byte count that does not match the shape, or ``in`` not a multiple of the block size ->
    ModelError naming the tensor."""
    import gguf

    qtype = _gguf_type(name, ggml_type)
    blocks = _gguf_blocks(name, qtype, raw, shape)
    convert = _GGUF_CONVERTERS.get(qtype.name)
    if convert is not None:
        return convert(name, blocks, dtype)
    values = gguf.quants.dequantize(blocks.reshape(shape[0], -1), qtype)  # float32 [out, in]
    return torch.from_numpy(np.array(values, dtype=np.float32)).to(dtype)


def _gguf_type(name: str, ggml_type: int) -> Any:
    import gguf

    try:
        qtype = gguf.GGMLQuantizationType(int(ggml_type))
    except ValueError:
        qtype = None
    if qtype is None or not (qtype.name in _GGUF_CONVERTERS or _gguf_reads(qtype)):
        label = qtype.name if qtype is not None else f"type {int(ggml_type)}"
        raise ModelError(
            f"{name}: GGUF tensor type {label} is not supported",
            hint=f"supported: {', '.join(gguf_types_supported())}",
        )
    return qtype


@functools.cache
def _gguf_reads(qtype: Any) -> bool:
    """Whether gguf.quants.dequantize reads this type (tried on one zero block)."""
    import gguf

    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def gguf_types_supported() -> list[str]:
    """The GGUF tensor types ``from_gguf`` converts."""
    import gguf

    return [t.name for t in gguf.GGMLQuantizationType if t.name in _GGUF_CONVERTERS or _gguf_reads(t)]


def _gguf_blocks(name: str, qtype: Any, raw: npt.NDArray[Any], shape: tuple[int, int]) -> Blocks:
    """Check the bytes against the shape and type; view them as [out, blocks per row, bytes per block]."""
    import gguf

    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if len(shape) != 2 or min(shape) <= 0:
        raise ModelError(f"{name}: a weight needs a 2-D (out, in) shape, got {tuple(shape)}")
    out, inn = int(shape[0]), int(shape[1])
    if inn % block:
        raise ModelError(
            f"{name}: {qtype.name} stores rows in blocks of {block} values; shape {(out, inn)} has {inn} per row",
            hint="shape is HF order (out, in); the GGUF reader lists it reversed, [in, out]",
        )
    need, found = out * (inn // block) * type_size, int(raw.nbytes)
    if found != need:
        raise ModelError(
            f"{name}: {qtype.name} of shape {(out, inn)} needs {need} bytes, found {found}",
            hint="a truncated file, or a shape given in GGUF order [in, out] instead of HF order (out, in)",
        )
    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    return data.reshape(out, inn // block, type_size)


def _f16(blocks: Blocks, at: int) -> npt.NDArray[np.float32]:
    """The fp16 at byte ``at`` of every block -> float32 [out, blocks per row]."""
    return np.ascontiguousarray(blocks[..., at : at + 2]).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: Blocks, run: int) -> torch.Tensor:
    """Nibble bytes [out, nb, bytes] in llama.cpp's order -> codes [out, in] uint8: each run of ``run`` bytes holds
    ``run`` values in its low nibbles, then the next ``run`` values in its high nibbles."""
    out, nb, size = qs.shape
    runs = qs.reshape(out, nb, size // run, 1, run)
    values = np.concatenate((runs & 15, runs >> 4), axis=3)  # [out, nb, runs, 2, run]
    return torch.from_numpy(values.reshape(out, -1))


def _group_major(t: npt.NDArray[np.float32]) -> torch.Tensor:
    """[out, groups] -> [groups, out] fp32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(t.T))


def _gguf_q4_0(name: str, blocks: Blocks, dtype: torch.dtype) -> Weight:
    d = _f16(blocks, 0)  # [out, nb]
    scale = _group_major(d)
    return _as_int4(name, _nibbles(blocks[..., 2:], 16), scale, torch.zeros_like(scale), 32, dtype)


def _gguf_q4_1(name: str, blocks: Blocks, dtype: torch.dtype) -> Weight:
    d, m = _f16(blocks, 0), _f16(blocks, 2)  # [out, nb]
    return _as_int4(name, _nibbles(blocks[..., 4:], 16), _group_major(d), _group_major(m + 8 * d), 32, dtype)


def _k_scales(packed: Blocks) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """Q4_K's 12 bytes -> eight 6-bit scales and eight 6-bit mins [out, nb, 8]: sub-blocks 0..3 in the low 6 bits
    of bytes 0..3 (scales) and 4..7 (mins); 4..7 in bytes 8..11's nibbles plus the top 2 bits of bytes 0..7."""
    a, b, c = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = np.concatenate((a & 63, (c & 15) | ((a >> 6) << 4)), axis=-1)
    mins = np.concatenate((b & 63, (c >> 4) | ((b >> 6) << 4)), axis=-1)
    return scales, mins


def _gguf_q4_k(name: str, blocks: Blocks, dtype: torch.dtype) -> Weight:
    out = blocks.shape[0]
    d, dmin = _f16(blocks, 0)[..., None], _f16(blocks, 2)[..., None]  # [out, nb, 1]
    sc, mn = _k_scales(blocks[..., 4:16])
    scale = d * sc.astype(np.float32)  # [out, nb, 8]
    zero = 8 * scale - dmin * mn.astype(np.float32)
    return _as_int4(
        name,
        _nibbles(blocks[..., 16:], 32),
        _group_major(scale.reshape(out, -1)),
        _group_major(zero.reshape(out, -1)),
        32,
        dtype,
    )


def _gguf_q8_0(name: str, blocks: Blocks, dtype: torch.dtype) -> Weight:
    d = _f16(blocks, 0)[..., None]  # [out, nb, 1]
    values = blocks[..., 2:].view(np.int8).astype(np.float32) * d  # [out, nb, 32], exact in fp32
    return quantize_int8(torch.from_numpy(values.reshape(blocks.shape[0], -1)), dtype)


def _gguf_q8_k(name: str, blocks: Blocks, dtype: torch.dtype) -> Weight:
    """Q8_K: fp32 d, 256 int8 codes, 16 int16 sums (unused): w = d q, kept in float."""
    d = np.ascontiguousarray(blocks[..., 0:4]).view(np.float32)  # [out, nb, 1]
    values = blocks[..., 4:260].view(np.int8).astype(np.float32) * d
    return torch.from_numpy(values.reshape(blocks.shape[0], -1)).to(dtype)


#: GGUF types that become quantized weights (the rest are kept in float).
GGUF_QUANTIZED = ("Q4_0", "Q4_1", "Q4_K", "Q8_0")
GGUF_INT4 = ("Q4_0", "Q4_1", "Q4_K")  # the types read exactly as Int4Affine (groups of 32)

_GGUF_CONVERTERS = {
    "Q4_0": _gguf_q4_0,
    "Q4_1": _gguf_q4_1,
    "Q4_K": _gguf_q4_k,
    "Q8_0": _gguf_q8_0,
    "Q8_K": _gguf_q8_k,
}


# -- 4-bit safetensors formats --------------------------------------------------------------------------------

_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ's GEMM packing: nibble i of an int32 holds column 8c + _AWQ_ORDER[i]


def _int32_nibbles(name: str, what: str, packed: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 [a, b] -> its eight 4-bit values per word, lowest bits first, along ``dim``: uint8 [8a, b] or [a, 8b]."""
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ModelError(f"{name}: {what} must be a 2-D int32 tensor, got {packed.dtype} {_shape(packed)}")
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    if dim == 1:
        return ((packed[:, :, None] >> shifts) & 15).reshape(packed.shape[0], -1).to(torch.uint8)
    return ((packed[:, None, :] >> shifts[:, None]) & 15).reshape(-1, packed.shape[1]).to(torch.uint8)


def _expect(name: str, what: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ModelError(f"{name}: {what} should have shape {list(shape)} for this weight, got {_shape(t)}")


def _groups(name: str, in_features: int, scales: torch.Tensor, axis: int) -> int:
    """The group size implied by a scales tensor with one entry per group along ``axis``."""
    n = int(scales.shape[axis]) if scales.dim() == 2 else 0
    if n == 0 or in_features % n:
        raise ModelError(f"{name}: scales {_shape(scales)} do not split {in_features} input columns into groups")
    return in_features // n


def _refuse_act_order(name: str, g_idx: torch.Tensor | None, in_features: int, group: int) -> None:
    if g_idx is None:
        return
    if not torch.equal(g_idx.reshape(-1).long(), torch.arange(in_features, device=g_idx.device) // group):
        raise ModelError(
            f"{name}: act-order (desc_act) GPTQ is not supported: its g_idx is not arange({in_features}) // {group}",
            hint="use a checkpoint quantized with desc_act=False (or re-quantize without act-order)",
        )


def from_awq(
    name: str, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype
) -> Int4Affine:
    """One linear of an AWQ (GEMM) checkpoint: qweight int32 [in, out / 8], qzeros int32 [in / group, out / 8]
    (both packed along out in AWQ's order 0 2 4 6 1 3 5 7), scales [in / group, out]; w = (q - z) * s.
    zero = (8 - z) * s in fp32: exact there."""
    codes = _int32_nibbles(name, "qweight", qweight, 1)  # [in, out], AWQ order within each 8
    inn, out = codes.shape
    group = _groups(name, inn, scales, 0)
    _expect(name, "scales", scales, (inn // group, out))
    _expect(name, "qzeros", qzeros, (inn // group, out // 8))
    order = torch.tensor(_AWQ_ORDER).argsort()  # column j of each 8 is nibble order[j]
    q = codes.view(inn, -1, 8)[..., order].reshape(inn, out).t()  # [out, in]
    z = _int32_nibbles(name, "qzeros", qzeros, 1).view(-1, out // 8, 8)[..., order].reshape(-1, out).float()
    s = scales.float()
    return _as_int4(name, q.contiguous(), s, (8 - z) * s, group, dtype)


def from_gptq(
    name: str,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    *,
    checkpoint_format: Literal["gptq", "gptq_v2"] = "gptq",
    dtype: torch.dtype,
) -> Int4Affine:
    """One linear of a 4-bit GPTQ checkpoint: qweight int32 [in / 8, out] (packed along in, low nibble first),
    qzeros int32 [in / group, out / 8] (packed along out), scales [in / group, out]; w = (q - z) * s, where the
    original format (checkpoint_format "gptq") stores z - 1 and "gptq_v2" stores z. Act-order files (a g_idx
    other than arange(in) // group) are refused. zero = (8 - z) * s in fp32: exact there."""
    q = _int32_nibbles(name, "qweight", qweight, 0)  # [in, out]
    inn, out = q.shape
    group = _groups(name, inn, scales, 0)
    _expect(name, "scales", scales, (inn // group, out))
    _expect(name, "qzeros", qzeros, (inn // group, -(-out // 8)))
    _refuse_act_order(name, g_idx, inn, group)
    z = _int32_nibbles(name, "qzeros", qzeros, 1)[:, :out].float() + (1 if checkpoint_format == "gptq" else 0)
    s = scales.float()
    return _as_int4(name, q.t().contiguous(), s, (8 - z) * s, group, dtype)


def from_compressed_tensors(
    name: str,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None = None,
    weight_shape: torch.Tensor | None = None,
    weight_g_idx: torch.Tensor | None = None,
    *,
    dtype: torch.dtype,
) -> Int4Affine:
    """One linear of a compressed-tensors ``pack-quantized`` 4-bit checkpoint: weight_packed int32 [out, in / 8]
    (eight values per word, lowest bits first, each stored as signed + 8), weight_scale [out, in / group],
    weight_zero_point (asymmetric only) int32 [out / 8, in / group] packed along out the same way, weight_shape
    (out, in). w = (q - zp) * s with q and zp signed, i.e. (stored q - stored zp) * s; symmetric: zp = 0.
    zero = (8 - stored zp) * s in fp32: exact there."""
    codes = _int32_nibbles(name, "weight_packed", weight_packed, 1)  # [out, 8 * words]
    out = codes.shape[0]
    inn = int(weight_shape.reshape(-1)[1]) if weight_shape is not None else codes.shape[1]
    if weight_shape is not None and (int(weight_shape.reshape(-1)[0]) != out or not 0 < inn <= codes.shape[1]):
        raise ModelError(f"{name}: weight_shape {weight_shape.tolist()} does not match weight_packed {_shape(codes)}")
    group = _groups(name, inn, weight_scale, 1)
    _expect(name, "weight_scale", weight_scale, (out, inn // group))
    _refuse_act_order(name, weight_g_idx, inn, group)
    s = weight_scale.float().t()  # [in / group, out]
    zp = torch.full_like(s, 8.0)
    if weight_zero_point is not None:
        _expect(name, "weight_zero_point", weight_zero_point, (-(-out // 8), inn // group))
        zp = _int32_nibbles(name, "weight_zero_point", weight_zero_point, 0)[:out].float().t()
    return _as_int4(name, codes[:, :inn].contiguous(), s, (8 - zp) * s, group, dtype)
