"""Quantized weights (homespec/model/quant.py): every kernel against its own dequantized weight, every converter
against a reference (gguf's dequantization, or float weights quantized and packed here by each format's published
formula), the real bundled GGUF, and every refusal.

Tolerances: fp32 kernels within 1e-5 of the fp32 reference (relative to the output's largest value); bf16 and fp16
outputs within 2^-7 relative plus 2e-3 of the largest value (output rounding, accumulation in another order).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from homespec.errors import ModelError
from homespec.model import quant
from homespec.model.quant import Int4Affine, Int8Channel

T = gguf.GGMLQuantizationType
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (sm80+ for the int4 kernel)")


def check_close(y: torch.Tensor, ref: torch.Tensor) -> None:
    """The tolerance for a kernel output of y's dtype against an fp32 reference."""
    top = float(ref.abs().max())
    if y.dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * top)
    else:
        torch.testing.assert_close(y.float(), ref, rtol=2**-7, atol=2e-3 * top)


def reference(x: torch.Tensor, w: quant.Weight) -> torch.Tensor:
    """x @ w.T in fp32 from the weight's exact dequantized values."""
    assert not isinstance(w, torch.Tensor)
    return x.float() @ w.dequantize(torch.float32).T


# -- layouts ----------------------------------------------------------------------------------------------------


@given(st.integers(1, 5), st.integers(1, 8), st.data())
@settings(max_examples=30, deadline=None)
def test_nibbles_round_trip(rows: int, half: int, data: st.DataObject) -> None:
    q = torch.tensor(data.draw(st.lists(st.integers(0, 15), min_size=rows * half * 2, max_size=rows * half * 2)))
    q = q.view(rows, 2 * half).to(torch.uint8)
    assert torch.equal(quant.unpack_nibbles(quant.pack_nibbles(q)), q)


def test_nibble_order_is_low_first_and_cuda_order_high_first() -> None:
    codes = quant.pack_nibbles(torch.tensor([[1, 2, 3, 4]]))
    assert codes.tolist() == [[0x21, 0x43]]
    q = torch.tensor([[1, 2, 3, 4]])  # torch's test__int4_mm packs (q[:, ::2] << 4 | q[:, 1::2]) for CUDA
    assert torch.equal(quant.high_nibble_first(codes), ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8))


# -- kernels ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("n", [1, 33])
def test_int4_kernel_matches_dequantized(dtype: torch.dtype, group: int, n: int) -> None:
    torch.manual_seed(group + n)
    w = quant.quantize_int4(torch.randn(40, 512), group, dtype)  # 40 rows: the CPU kernel copy is padded to 48
    assert w.kernel is not None and w.kernel.rows == 48
    x = torch.randn(3, n, 512).to(dtype)
    y = w.linear(x)
    assert y.shape == (3, n, 40) and y.dtype == dtype
    check_close(y.view(-1, 40), reference(x.view(-1, 512), w))
    assert torch.equal(w.linear(x[0, :1]), y[0, :1])  # a row's output does not depend on the other rows


def test_int4_rows_across_pack_chunks() -> None:
    torch.manual_seed(1)
    w = quant.quantize_int4(torch.randn(4096 + 40, 64), 32, torch.float32)  # two pack calls, the last one padded
    x = torch.randn(5, 64)
    check_close(w.linear(x), reference(x, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_without_kernel_and_other_dtype_dequantize(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    w = quant.quantize_int4(torch.randn(64, 256), 64, dtype)
    x = torch.randn(7, 256).to(dtype)
    check_close(dataclasses.replace(w, kernel=None).linear(x), reference(x, w))
    half = x.half()  # not the weight's dtype: dequantized into fp16 for this call
    assert w.linear(half).dtype == torch.float16
    check_close(w.linear(half), reference(half, w))
    assert w.linear(x[:0]).shape == (0, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 33])
def test_int8_kernel_matches_dequantized(dtype: torch.dtype, n: int) -> None:
    torch.manual_seed(n)
    w = quant.quantize_int8(torch.randn(40, 96), dtype)
    x = torch.randn(n, 96).to(dtype)
    y = w.linear(x)
    assert y.dtype == dtype
    check_close(y, reference(x, w))
    other = torch.float16 if dtype != torch.float16 else torch.float32  # cast to the weight's dtype and back
    y2 = w.linear(x.to(other))
    assert y2.dtype == other
    check_close(y2 if y2.dtype != torch.float32 else y2.to(dtype), reference(x.to(other).to(dtype), w))


@pytest.mark.parametrize("make", [lambda w: quant.quantize_int4(w, 32), quant.quantize_int8])
def test_rows_select_and_permute_agree_with_dequantize(make: Any) -> None:
    torch.manual_seed(3)
    w = make(torch.randn(48, 64))
    full = w.dequantize()
    index = torch.tensor([5, 0, 47, 5, 12])
    assert torch.equal(w.rows(index), full[index])
    assert torch.equal(quant.embedding(index.view(1, 5), w), full[index].view(1, 5, 64))
    part = w.select_rows(index)
    assert (part.out_features, part.in_features) == (5, 64) and torch.equal(part.dequantize(), full[index])
    x = torch.randn(3, 64)
    check_close(part.linear(x), x @ full[index].T)  # 5 rows: padded again in its own kernel copy
    order = torch.randperm(48)
    assert torch.equal(quant.permute_rows(w, order).dequantize(), full[order])


def test_module_functions_take_every_kind() -> None:
    torch.manual_seed(4)
    dense = torch.randn(64, 128)
    bias = torch.randn(64)
    x = torch.randn(2, 128)
    ids = torch.tensor([[3, 1]])
    for w in (dense, quant.quantize_int4(dense, 32), quant.quantize_int8(dense)):
        values = w if isinstance(w, torch.Tensor) else w.dequantize()
        check_close(quant.linear(x, w, bias), x @ values.T + bias)
        assert torch.equal(quant.embedding(ids, w), values[ids])
    assert quant.weight_nbytes(dense) == 64 * 128 * 4


def test_bytes_per_weight() -> None:
    w = torch.randn(64, 256)
    per = {
        (kind, dtype): quant.weight_nbytes(make(w, dtype)) / w.numel()
        for kind, make in (("int4/32", lambda w, d: quant.quantize_int4(w, 32, d)), ("int8", quant.quantize_int8))
        for dtype in (torch.bfloat16, torch.float32)
    }
    assert per[("int4/32", torch.bfloat16)] == 0.5 + 0.5 + 2 * 2 / 32  # codes, CPU kernel copy, scales + zeros
    assert per[("int4/32", torch.float32)] == 0.5 + 0.5 + 2 * 4 / 32
    assert per[("int8", torch.bfloat16)] == 1 + 2 / 256
    assert quant.weight_nbytes(quant.quantize_int4(w, 128, torch.bfloat16)) / w.numel() == 1 + 4 / 128
    compact = quant.compact(quant.quantize_int4(w, 32, torch.bfloat16))  # a stage's linear: the kernel copy alone
    assert quant.weight_nbytes(compact) / w.numel() == 0.5 + 2 * 2 / 32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("out", [64, 40, 200])  # whole 64-row blocks, a padded tail, both
def test_a_compact_int4_weight_gives_back_its_exact_codes(dtype: torch.dtype, out: int) -> None:
    """Without its plain codes, a weight reads them back through the kernel (whatever this CPU's packed layout):
    the same codes, the same products, rows, row selections and moves as the full weight."""
    torch.manual_seed(out)
    full = quant.quantize_int4(torch.randn(out, 1024), 32, dtype)
    small = quant.compact(full)
    assert isinstance(small, Int4Affine) and small.codes is None and full.codes is not None
    assert torch.equal(small.plain_codes(), full.codes)
    x = torch.randn(3, 1024, dtype=dtype)
    assert torch.equal(quant.linear(x, small), quant.linear(x, full))
    assert torch.equal(small.dequantize(), full.dequantize())
    idx = torch.tensor([out - 1, 0, 7])
    assert torch.equal(quant.embedding(idx, small), quant.embedding(idx, full))
    picked = quant.select_rows(small, idx)
    assert isinstance(picked, Int4Affine) and torch.equal(picked.plain_codes(), full.codes[idx])


# -- round-to-nearest -------------------------------------------------------------------------------------------


def test_quantize_int4_error_bound_and_determinism() -> None:
    torch.manual_seed(5)
    w = torch.randn(32, 256) * torch.rand(32, 1)
    a, b = quant.quantize_int4(w, 64), quant.quantize_int4(w.clone(), 64)
    assert torch.equal(a.plain_codes(), b.plain_codes()) and torch.equal(a.scales_and_zeros, b.scales_and_zeros)
    assert a.kernel is not None and b.kernel is not None and torch.equal(a.kernel.packed, b.kernel.packed)
    rtn = quant.quantize_int4(w, 64, search=False)
    scale = rtn.scales_and_zeros[..., 0].t().repeat_interleave(64, 1)  # [out, in]
    assert bool(((w - rtn.dequantize()).abs() <= scale / 2 * (1 + 1e-5)).all())  # round-to-nearest's bound
    for make in (lambda x: quant.quantize_int4(x, 32), lambda x: quant.quantize_int4(x, 32, search=False)):
        constant = torch.full((16, 32), 0.3)
        assert torch.equal(make(constant).dequantize(), constant)  # scale 0, zero = the value


@pytest.mark.parametrize("group", [32, 128])
def test_the_int4_search_beats_round_to_nearest_on_every_group(group: int) -> None:
    """The searched grid's squared error is at most round-to-nearest's in every group (t = 0 is one of its grids),
    and clearly lower overall, most of all on groups with an outlier."""
    torch.manual_seed(group)
    w = torch.randn(64, 512)
    w[torch.arange(64), torch.randint(0, 512, (64,))] *= 8  # one outlier per row
    err = {
        search: ((w - quant.quantize_int4(w, group, torch.float32, search=search).dequantize()) ** 2)
        .view(64, -1, group)
        .sum(-1)
        for search in (False, True)
    }
    assert bool((err[True] <= err[False] * (1 + 1e-4)).all())
    assert float(err[True].sum()) < 0.9 * float(err[False].sum())


def test_quantize_int8_error_bound() -> None:
    torch.manual_seed(6)
    w = torch.randn(16, 64)
    q = quant.quantize_int8(w)
    assert int(q.codes.abs().max()) == 127
    assert bool(((w - q.dequantize()).abs() <= q.scales[:, None] / 2 * (1 + 1e-5)).all())
    assert torch.equal(quant.quantize_int8(torch.zeros(2, 8)).dequantize(), torch.zeros(2, 8))


# -- llama.cpp's Q/K permutation --------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_head", "out"), [(9, 576), (3, 192), (1, 4)])
def test_llama_qk_order_undoes_llama_cpp_permute(n_head: int, out: int) -> None:
    hf = torch.randn(out, 32)
    gguf_order = hf.reshape(n_head, 2, out // n_head // 2, 32).swapaxes(1, 2).reshape(out, 32)  # convert_hf_to_gguf
    order = quant.llama_qk_order(n_head, out)
    undone = quant.permute_rows(gguf_order, order)
    assert isinstance(undone, torch.Tensor) and torch.equal(undone, hf)
    for w in (quant.quantize_int4(gguf_order, 32, torch.float32), quant.quantize_int8(gguf_order)):
        assert torch.equal(quant.permute_rows(w, order).dequantize(), w.dequantize()[order])
    assert quant.llama_qk_order(1, 4).tolist() == [0, 2, 1, 3]


# -- GGUF -------------------------------------------------------------------------------------------------------

_F16_AT = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q8_0: [0], T.Q6_K: [208], T.Q5_0: [0]}


def random_blocks(qtype: T, out: int, inn: int, seed: int) -> np.ndarray:
    """Random GGUF blocks [out, bytes per row]: random code bytes, fp16 scales of either sign in [1e-3, 1e-1]."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (out, inn // block, size), dtype=np.uint8)
    for at in _F16_AT[qtype]:
        d = rng.uniform(1e-3, 1e-1, (out, inn // block)) * rng.choice([-1.0, 1.0], (out, inn // block))
        raw[..., at : at + 2] = d.astype(np.float16).view(np.uint8).reshape(out, -1, 2)
    return raw.reshape(out, -1)


def exact(raw: np.ndarray, qtype: T) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q4_K])
def test_gguf_int4_types_are_exact(qtype: T) -> None:
    raw = random_blocks(qtype, 48, 512, seed=int(qtype))
    w = quant.from_gguf("blk.0.ffn_up.weight", qtype, raw, (48, 512), torch.float32)
    assert isinstance(w, Int4Affine) and w.group == 32
    ref = exact(raw, qtype)
    # Q4_0: bit-identical; Q4_1 and Q4_K: within one fp32 rounding of the zero (2^-22 of the largest value)
    torch.testing.assert_close(w.dequantize(), ref, rtol=0, atol=2**-22 * float(ref.abs().max()))
    if qtype == T.Q4_0:
        assert torch.equal(w.dequantize(), ref)
    x = torch.randn(4, 512)
    check_close(w.linear(x), x @ ref.T)


def test_gguf_q8_0_requantized_within_half_a_row_scale() -> None:
    raw = random_blocks(T.Q8_0, 32, 256, seed=8)
    ref = exact(raw, T.Q8_0)
    for dtype, bound in ((torch.float32, 1 / 254 * (1 + 1e-5)), (torch.bfloat16, 1 / 254 + 2**-8)):
        w = quant.from_gguf("token_embd.weight", T.Q8_0, raw, (32, 256), dtype)
        assert isinstance(w, Int8Channel) and w.dtype == dtype
        rel = (w.dequantize(torch.float32) - ref).abs().amax(1) / ref.abs().amax(1)
        assert float(rel.max()) <= bound


def test_gguf_other_types_kept_in_float_exactly() -> None:
    for qtype in (T.Q6_K, T.Q5_K, T.Q5_0):
        raw = random_blocks(qtype, 16, 256, seed=int(qtype))
        w = quant.from_gguf("output.weight", qtype, raw, (16, 256), torch.float32)
        assert isinstance(w, torch.Tensor) and torch.equal(w, exact(raw, qtype))
    values = np.random.default_rng(9).standard_normal((16, 64)).astype(np.float32)
    for qtype, data in ((T.F32, values), (T.F16, values.astype(np.float16))):
        w = quant.from_gguf("output.weight", qtype, data, (16, 64), torch.bfloat16)
        assert isinstance(w, torch.Tensor) and w.dtype == torch.bfloat16
        assert torch.equal(w, torch.from_numpy(data.astype(np.float32)).bfloat16())
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)
    w = quant.from_gguf("output.weight", T.BF16, bf16.view(np.uint8), (16, 64), torch.float32)
    assert torch.equal(w, torch.from_numpy((bf16.astype(np.uint32) << 16).view(np.float32)))  # type: ignore[arg-type]


def test_gguf_q8_k_is_d_times_q() -> None:
    block = np.zeros(292, np.uint8)  # fp32 d, 256 int8 codes, 16 int16 sums
    block[0:4] = np.array([0.5], np.float32).view(np.uint8)
    block[4:260] = np.arange(-128, 128).astype(np.int8).view(np.uint8)
    w = quant.from_gguf("x", T.Q8_K, block[None], (1, 256), torch.float32)
    assert torch.equal(w, 0.5 * torch.arange(-128.0, 128.0)[None])  # type: ignore[arg-type]


def test_bundled_gguf_tensors() -> None:
    from homespec.model.gguf_file import read_index
    from homespec.model.loader import bundled_gguf

    tensors = read_index(bundled_gguf())[1]  # the same tensors as gguf.GGUFReader's (the test below)
    q = tensors["blk.0.attn_q.weight"]
    assert q.tensor_type == T.Q4_1
    shape = (q.dims[1], q.dims[0])  # GGML order [in, out]
    w = quant.from_gguf(q.name, q.tensor_type, q.data, shape, torch.float32)
    assert isinstance(w, Int4Affine) and torch.equal(w.dequantize(), exact(q.data, T.Q4_1))
    embd = tensors["token_embd.weight"]
    assert embd.tensor_type == T.Q8_0
    e = quant.from_gguf(embd.name, embd.tensor_type, embd.data, (embd.dims[1], embd.dims[0]), torch.float32)
    assert isinstance(e, Int8Channel)
    ref = exact(embd.data, T.Q8_0)
    rel = (e.dequantize(torch.float32) - ref).abs().amax(1) / ref.abs().amax(1)
    assert float(rel.max()) <= 1 / 254 * (1 + 1e-5)  # measured: 0.003937 (= 1/254)


# -- AWQ, GPTQ, compressed-tensors: written here in each published layout ---------------------------------------


def pack_words(values: torch.Tensor, dim: int, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """uint 0..15 [a, b] -> int32 with eight values per word along ``dim``: bits 4i hold value ``order[i]``."""
    v = values.numpy().astype(np.uint32)
    v = v if dim == 1 else v.T
    v = v.reshape(v.shape[0], -1, 8)
    words = np.zeros(v.shape[:2], np.uint32)
    for i, j in enumerate(order):
        words |= v[..., j] << np.uint32(4 * i)
    words = words if dim == 1 else words.T
    return torch.from_numpy(np.ascontiguousarray(words).view(np.int32))


def minmax_codes(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit codes of w [in, out] by groups of input rows: q [in, out], z and fp16 s [in / group, out]."""
    g = w.view(-1, group, w.shape[1])
    s = ((g.amax(1) - g.amin(1)) / 15).half()
    z = torch.round(-g.amin(1) / s.float()).clamp(1, 15)
    q = (torch.round(g / s.float()[:, None]) + z[:, None]).clamp(0, 15).view_as(w)
    return q.to(torch.uint8), z.to(torch.uint8), s


def expected(q: torch.Tensor, z: torch.Tensor, s: torch.Tensor, group: int) -> torch.Tensor:
    """(q - z) * s as [out, in] fp32, from [in, out] codes and [in / group, out] zeros and scales."""
    zz, ss = z.float().repeat_interleave(group, 0), s.float().repeat_interleave(group, 0)
    return ((q.float() - zz) * ss).t()


@pytest.mark.parametrize("group", [32, 128])
def test_awq_gemm(group: int) -> None:
    torch.manual_seed(10)
    q, z, s = minmax_codes(torch.randn(256, 64), group)  # [in, out]
    qweight = pack_words(q, 1, (0, 2, 4, 6, 1, 3, 5, 7))  # [in, out / 8]
    qzeros = pack_words(z, 1, (0, 2, 4, 6, 1, 3, 5, 7))  # [in / group, out / 8]
    w = quant.from_awq("model.layers.0.mlp.up_proj", qweight, qzeros, s, torch.float32)
    assert w.group == group and torch.equal(w.dequantize(), expected(q, z, s, group))


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptq(fmt: Any) -> None:
    torch.manual_seed(11)
    q, z, s = minmax_codes(torch.randn(256, 64), 64)
    stored = z - 1 if fmt == "gptq" else z  # the original format stores zero - 1
    qweight, qzeros = pack_words(q, 0), pack_words(stored, 1)  # [in / 8, out], [in / group, out / 8]
    g_idx = torch.arange(256) // 64
    w = quant.from_gptq("q_proj", qweight, qzeros, s, g_idx, checkpoint_format=fmt, dtype=torch.float32)
    assert torch.equal(w.dequantize(), expected(q, z, s, 64))
    with pytest.raises(ModelError, match="q_proj: act-order"):
        quant.from_gptq("q_proj", qweight, qzeros, s, g_idx[torch.randperm(256)], dtype=torch.float32)


@pytest.mark.parametrize("group", [32, 1024])  # 1024: one group per row (channel strategy), run as groups of 256
def test_compressed_tensors_symmetric(group: int) -> None:
    torch.manual_seed(12)
    w = torch.randn(64, 1024).view(64, -1, group)
    s = (w.abs().amax(-1) / 7.5).half()  # [out, in / group]
    q = torch.round(w / s.float()[..., None]).clamp(-8, 7).view(64, 1024)  # signed
    packed = pack_words((q + 8).to(torch.uint8), 1)  # [out, in / 8]
    got = quant.from_compressed_tensors("o_proj", packed, s, weight_shape=torch.tensor([64, 1024]), dtype=torch.float32)
    assert got.group == min(group, 256)
    assert torch.equal(got.dequantize(), q * s.float().repeat_interleave(group, 1))


def test_compressed_tensors_asymmetric() -> None:
    torch.manual_seed(13)
    q8, z8, s = minmax_codes(torch.randn(128, 64), 32)  # unsigned [in, out] codes, zeros [in / 32, out]
    q, zp = q8.t().float() - 8, z8.t().float() - 8  # signed, [out, in] and [out, in / 32]
    packed = pack_words(q8.t().contiguous(), 1)  # [out, in / 8]
    packed_zp = pack_words(z8.t().contiguous(), 0)  # [out / 8, in / 32]
    w = quant.from_compressed_tensors("o_proj", packed, s.t(), packed_zp, torch.tensor([64, 128]), dtype=torch.float32)
    assert torch.equal(w.dequantize(), (q - zp.repeat_interleave(32, 1)) * s.t().float().repeat_interleave(32, 1))


# -- refusals ---------------------------------------------------------------------------------------------------


def test_gguf_refusals_name_the_tensor() -> None:
    name = "blk.3.attn_k.weight"
    raw = random_blocks(T.Q4_1, 8, 64, seed=14)  # 8 rows of 2 blocks, 20 bytes each
    with pytest.raises(ModelError, match=rf"{re.escape(name)}: Q4_1 of shape \(8, 64\) needs 320 bytes, found 300"):
        quant.from_gguf(name, T.Q4_1, raw.reshape(-1)[:300], (8, 64), torch.float32)
    with pytest.raises(
        ModelError, match=rf"{re.escape(name)}: Q4_1 stores rows in blocks of 32 values; shape \(64, 8\)"
    ):
        quant.from_gguf(name, T.Q4_1, raw, (64, 8), torch.float32)  # GGUF order by mistake
    with pytest.raises(ModelError, match=rf"{re.escape(name)}: a weight needs a 2-D \(out, in\) shape"):
        quant.from_gguf(name, T.Q4_1, raw, (512,), torch.float32)  # type: ignore[arg-type]
    for bad in (T.Q8_1, T.I32, 999):
        with pytest.raises(ModelError, match=rf"{re.escape(name)}: GGUF tensor type") as err:
            quant.from_gguf(name, bad, raw, (8, 64), torch.float32)
        assert err.value.hint is not None and "Q4_K" in err.value.hint and "Q6_K" in err.value.hint


def test_format_refusals_name_the_tensor() -> None:
    q, z, s = minmax_codes(torch.randn(128, 64), 32)
    qweight, qzeros = pack_words(q, 1), pack_words(z, 1)
    with pytest.raises(ModelError, match="up_proj: scales"):
        quant.from_awq("up_proj", qweight, qzeros, s[:, :32], torch.float32)
    with pytest.raises(ModelError, match=r"up_proj: scales \[3, 64\] do not split 128"):
        quant.from_awq("up_proj", qweight, qzeros, s[:3], torch.float32)
    with pytest.raises(ModelError, match="up_proj: qzeros"):
        quant.from_awq("up_proj", qweight, qzeros[:2], s, torch.float32)
    with pytest.raises(ModelError, match="up_proj: qweight must be a 2-D int32"):
        quant.from_gptq("up_proj", qweight.float(), qzeros, s, dtype=torch.float32)
    small = torch.randn(64, 64).half()
    with pytest.raises(ModelError, match="up_proj: groups of 16 input columns"):
        quant.from_compressed_tensors(
            "up_proj", pack_words(q.t()[:, :64].contiguous(), 1), small[:, :4], dtype=torch.float32
        )
    with pytest.raises(ModelError, match="up_proj: weight_zero_point"):
        quant.from_compressed_tensors("up_proj", pack_words(q.t().contiguous(), 1), s.t(), qzeros, dtype=torch.float32)


def test_quantizer_and_weight_refusals() -> None:
    for group in (16, 48, 512):
        with pytest.raises(ModelError, match=f"groups of {group}"):
            quant.quantize_int4(torch.randn(16, 1024), group)
    with pytest.raises(ModelError, match="96 input features in groups of 64"):
        quant.quantize_int4(torch.randn(16, 96), 64)
    w = quant.quantize_int4(torch.randn(16, 64), 32)
    with pytest.raises(ModelError, match=r"scales_and_zeros must be float \[2, 16, 2\], got \[2, 8, 2\]"):
        Int4Affine.from_codes(w.codes, w.scales_and_zeros[:, :8], 32)
    with pytest.raises(ModelError, match=r"takes 64 input features, got an input of shape \(2, 32\)"):
        w.linear(torch.randn(2, 32))
    with pytest.raises(ModelError, match=r"permutation of 0\.\.15"):
        quant.permute_rows(w, torch.zeros(16, dtype=torch.long))
    with pytest.raises(ModelError, match="int8 scales must be float"):
        Int8Channel(torch.zeros(4, 4, dtype=torch.int8), torch.ones(3))
    with pytest.raises(ModelError, match="do not split into 3 heads"):
        quant.llama_qk_order(3, 64)


# -- CUDA (run on a GPU machine) --------------------------------------------------------------------------------


@CUDA
@pytest.mark.parametrize(("out", "inn", "group"), [(40, 96, 32), (64, 256, 128), (4096 + 24, 512, 256)])
@pytest.mark.parametrize("n", [1, 33])
def test_cuda_int4_kernel(out: int, inn: int, group: int, n: int) -> None:
    torch.manual_seed(out + n)
    w = quant.quantize_int4(torch.randn(out, inn, device="cuda"), group, torch.bfloat16)
    capable = torch.version.hip is None and torch.cuda.get_device_capability() >= (8, 0)
    assert (w.kernel is not None) == capable
    x = torch.randn(n, inn, device="cuda").bfloat16()
    check_close(w.linear(x), reference(x, w))
    index = torch.tensor([3, 0, 7], device="cuda")
    assert torch.equal(w.rows(index), w.dequantize()[index])
    fp32 = quant.quantize_int4(torch.randn(out, inn, device="cuda"), group, torch.float32)
    assert fp32.kernel is None  # the CUDA kernel is bf16 only: fp32 dequantizes per call
    check_close(fp32.linear(x.float()), reference(x.float(), fp32))


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_int8(dtype: torch.dtype) -> None:
    torch.manual_seed(15)
    w = quant.quantize_int8(torch.randn(40, 96, device="cuda"), dtype)
    x = torch.randn(33, 96, device="cuda").to(dtype)
    check_close(w.linear(x), reference(x, w))


def test_split_rows_of_a_fused_weight_is_exact_for_every_kind() -> None:
    """Phi-3's fused qkv and gate/up are split by output rows at load: every part equals those rows of the whole,
    for float, int8 and (compact) int4 weights; sizes that do not add up name the tensor."""
    torch.manual_seed(9)
    dense = torch.randn(96, 64)
    for w in (dense, quant.quantize_int8(dense), quant.compact(quant.quantize_int4(dense, 32, torch.bfloat16))):
        whole = quant.as_tensor(w)
        parts = quant.split_rows(w, [48, 16, 32], "model.layers.0.self_attn.qkv_proj.weight")
        assert [quant.out_features(p) for p in parts] == [48, 16, 32]
        assert torch.equal(torch.cat([quant.as_tensor(p) for p in parts]), whole)
        with pytest.raises(ModelError, match=r"qkv_proj\.weight has 96 rows"):
            quant.split_rows(w, [48, 16, 16], "model.layers.0.self_attn.qkv_proj.weight")


# -- the GGUF tensor index (model/gguf_file.py) -----------------------------------------------------------------------


def _write_gguf(path: Any) -> None:
    """A small GGUF written by gguf's own writer: metadata of every shape (scalars, strings, a string array, a nested
    array), plain and block-quantized tensors."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_custom_alignment(64)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(300)])
    w.add_array("x.nested", [[1, 2], [3]])
    w.add_float32("x.eps", 1e-5)
    w.add_tensor("a.weight", rng.standard_normal((3, 64), dtype=np.float32))
    w.add_tensor("b.weight", rng.standard_normal((5, 32)).astype(np.float16))
    for t in (T.Q8_0, T.Q4_0):
        blocks = gguf.quants.quantize(rng.standard_normal((4, 64), dtype=np.float32), t)
        w.add_tensor(f"{t.name}.weight", blocks, raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_the_gguf_index_reads_what_gguf_reads_and_names_what_is_wrong(tmp_path: Any) -> None:
    """``gguf_file.read_index`` gives every tensor of a file (one written by gguf's writer, and the bundled model)
    with the type, dimensions and bytes ``gguf.GGUFReader`` gives; a cut, a wrong magic or a tensor past the end is
    a ModelError naming the file, at every cut point."""
    from homespec.model.gguf_file import read_index
    from homespec.model.loader import bundled_gguf

    small = tmp_path / "small.gguf"
    _write_gguf(small)
    for path in (small, bundled_gguf()):
        meta, ours = read_index(path)
        theirs = gguf.GGUFReader(str(path)).tensors
        assert sorted(ours) == sorted(t.name for t in theirs) and meta["general.architecture"] == "llama"
        for t in theirs:
            m = ours[t.name]
            assert (m.tensor_type, m.dims) == (t.tensor_type, tuple(int(d) for d in t.shape)), t.name
            assert m.data.dtype == t.data.dtype and np.array_equal(np.asarray(m.data), np.asarray(t.data)), t.name
    assert read_index(small)[0]["general.alignment"] == 64
    raw = small.read_bytes()
    end = max(t.data_offset + t.n_bytes for t in gguf.GGUFReader(str(small)).tensors)  # then padding
    bad = tmp_path / "bad.gguf"
    for cut in (3, 10, 30, 200, 2500, end - 1):
        bad.write_bytes(raw[:cut])
        with pytest.raises(ModelError, match=f"cannot read GGUF {re.escape(str(bad))}"):
            read_index(bad)
    bad.write_bytes(b"GGML" + raw[4:])
    with pytest.raises(ModelError, match="not a GGUF file"):
        read_index(bad)
