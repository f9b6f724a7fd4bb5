"""The native decode glue (``homespec/native``): built here, used by quantized stages, the same tokens as torch's
operators, a row's bits independent of its wave, and torch's operators where it cannot build."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from homespec import native
from homespec.core.tree import TokenTree
from homespec.model.loader import resolve
from homespec.model.quant import quantize_int8
from homespec.model.stage import NATIVE_ROWS, Stage, glue_product

needs_cc = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("cc", "gcc", "clang")), reason="no C compiler on this machine"
)


@pytest.fixture(scope="module")
def stages() -> tuple[Stage, Stage]:
    """The bundled model's int4 GGUF as one stage through the glue, and the same through torch's operators."""
    return whole("int4")


def whole(weights: str) -> tuple[Stage, Stage]:
    """The bundled model in ``weights`` (``bf16``: activations too) as one stage through the glue, and the same
    through torch's operators."""
    source, dtype = resolve(None), torch.bfloat16 if weights == "bf16" else torch.float32
    glued = Stage(source, 0, source.num_layers, weights=weights, dtype=dtype)
    return glued, Stage(source, 0, source.num_layers, weights=weights, dtype=dtype, native=False)


PROMPT = "<|im_start|>user\nName three rivers in Europe and say where each one ends.<|im_end|>\n<|im_start|>assistant\n"


def greedy(stage: Stage, ids: list[int], n: int) -> list[int]:
    cache = stage.new_cache(512, 16)
    logits = stage.forward_prefix(cache, torch.tensor(ids), range(len(ids)))
    out = [int(logits[-1].argmax())]
    for _ in range(n - 1):
        pos = len(ids) + len(out) - 1
        logits = stage.forward_prefix(cache, torch.tensor(out[-1:]), range(pos, pos + 1))
        out.append(int(logits[-1].argmax()))
    return out


@needs_cc
def test_cpu_stages_run_their_layers_through_the_glue(stages: tuple[Stage, Stage]) -> None:
    """Quantized and float stages (fp32, bf16) on the glue, their products in the dtype their weights take; fp16
    and ``native=False`` keep torch's operators."""
    glued, plain = stages
    assert glued.glue is not None and glued.glue_io == torch.bfloat16 and plain.glue is None
    source = resolve(None)
    assert Stage(source, 0, 2, weights="fp32").glue_io == torch.float32
    assert Stage(source, 0, 2, weights="bf16", dtype=torch.bfloat16).glue_io == torch.bfloat16
    assert Stage(source, 0, 2, weights="fp16", dtype=torch.float16).glue is None


def decode(stage: Stage, ids: list[int], tokens: list[int]) -> torch.Tensor:
    """Logits [len(tokens), vocab] of each token's position, the prompt as one chunk and then one row a step."""
    cache = stage.new_cache(512, 16)
    out = [stage.forward_prefix(cache, torch.tensor(ids), range(len(ids)))[-1]]
    for i, t in enumerate(tokens[:-1]):
        pos = len(ids) + i
        out.append(stage.forward_prefix(cache, torch.tensor([t]), range(pos, pos + 1))[-1])
    return torch.stack(out)


@needs_cc
@pytest.mark.parametrize("weights", ["int4", "fp32", "bf16"])
def test_the_glue_and_torch_operators_pick_the_same_tokens(stages: tuple[Stage, Stage], weights: str) -> None:
    """48 greedy tokens of a real prompt through torch's operators, then the glue fed the same tokens: at every step
    where torch's best logit beats its runner-up by more than 1% the glue picks the same token, and the logits are
    within bf16 rounding of each other. The two paths sum in different orders, and the LM head's logits are bf16, so
    where two logits sit within a step or two of each other (an exact tie happens here) either may come out on top.
    Float stages too (the glue's own products; a bf16 stage's residual stream in fp32 there, in bf16 in torch's)."""
    glued, plain = stages if weights == "int4" else whole(weights)
    ids = resolve(None).tokenizer()(PROMPT)["input_ids"]
    tokens = greedy(plain, ids, 48)
    want, got = decode(plain, ids, tokens), decode(glued, ids, tokens)
    assert torch.equal(want.argmax(-1), torch.tensor(tokens))
    top = want.topk(2, dim=-1).values
    clear = (top[:, 0] - top[:, 1]) > 0.01 * top[:, 0].abs()
    assert int(clear.sum()) >= 40  # the check below covers most of the steps
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    if weights == "fp32":  # no bf16 rounding on either path: the two orders of the sums differ in the last bits
        assert torch.equal(got.argmax(-1), want.argmax(-1)) and (got - want).abs().max() < 1e-3


@needs_cc
@pytest.mark.parametrize("weights", ["int4", "fp32", "bf16"])
def test_a_glued_row_gets_the_same_bits_in_a_tree_wave_as_decoded_alone(
    stages: tuple[Stage, Stage], weights: str
) -> None:
    """Siblings in one wave, their keys scattered over the tree slots: each node's logits are bit-identical to
    decoding its branch alone, cut into two chunks (attention one row at a time over its own keys). Float stages'
    products at a wave's few rows run one row at a time too (``glue_product``), a prefill's in torch's kernels,
    whose bits change with the chunk's rows: there the branch is cut where the wave's prefix ends."""
    glued = stages[0] if weights == "int4" else whole(weights)[0]
    prompt = resolve(None).tokenizer()(PROMPT)["input_ids"]
    tree = TokenTree(prompt[-1], len(prompt) - 1)
    a, _ = tree.add(tree.root.id, 1001, 0.0)
    b, _ = tree.add(tree.root.id, 1002, 0.0)
    c, _ = tree.add(a, 1003, 0.0)
    d, _ = tree.add(b, 1004, 0.0)
    e, _ = tree.add(c, 1005, 0.0)
    cache = glued.new_cache(512, 16)
    glued.forward_prefix(cache, torch.tensor(prompt[:-1]), range(len(prompt) - 1))
    ids = [tree.root.id, a, b, c, d, e]
    rows = tree.rows(ids)
    got = glued.forward_tree(cache, rows, torch.tensor([r.token for r in rows]))
    for i, node in enumerate(ids):
        seq = [*prompt[:-1], *tree.path_tokens(node)]
        fresh = glued.new_cache(512, 16)
        cut = len(seq) - 2 if weights == "int4" else len(prompt) - 1
        glued.forward_prefix(fresh, torch.tensor(seq[:cut]), range(cut))
        want = glued.forward_prefix(fresh, torch.tensor(seq[cut:]), range(cut, len(seq)))[-1]
        assert torch.equal(got[i], want), f"node {node}"


@needs_cc
@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8"])
def test_native_products_match_torch_and_give_a_row_its_bits_alone(kind: str) -> None:
    """``glue_product`` on float and int8 weights (q/k/v apart, their outputs side by side): within rounding of an
    fp32 reference, each row's bits the same alone as among up to ``NATIVE_ROWS`` rows, and torch's own kernels
    above that for float weights (int8: the glue's at any row count)."""
    glue = native.library()
    assert glue is not None
    g = torch.Generator().manual_seed(0)
    dtype = torch.float32 if kind == "fp32" else torch.bfloat16
    dense = [torch.randn(rows, 576, generator=g) for rows in (576, 192, 192)]
    parts: list[Any] = [quantize_int8(w, dtype) for w in dense] if kind == "int8" else [w.to(dtype) for w in dense]
    x = torch.randn(NATIVE_ROWS, 576, generator=g).to(dtype)
    got = glue_product(glue, x, parts)
    dense = [w.dequantize(torch.float32) if kind == "int8" else w.float() for w in parts]
    want = torch.cat([F.linear(x.float(), w) for w in dense], dim=1)
    assert got.dtype == dtype and got.shape == want.shape
    step = 1e-5 if dtype == torch.float32 else 2**-7  # bf16 outputs: a rounding of 2^-8 of the value, and the sums
    assert float((got.float() - want).abs().max()) <= step * float(want.abs().max())
    for n in (1, 3, 4, 5, NATIVE_ROWS):
        assert torch.equal(glue_product(glue, x[:n].contiguous(), parts), got[:n])
    assert torch.equal(glue_product(glue, x[7:8].contiguous(), parts)[0], got[7])
    many = torch.randn(NATIVE_ROWS + 1, 576, generator=g).to(dtype)
    if kind == "int8":  # native at any row count
        assert torch.equal(glue_product(glue, many, parts)[-1], glue_product(glue, many[-1:], parts)[0])
    else:
        assert torch.equal(glue_product(glue, many, parts), torch.cat([F.linear(many, w) for w in parts], dim=1))
        wide = glue_product(glue, many, parts, any_rows=True)  # the glue's at any row count: a row's bits alone
        assert torch.equal(wide[-1], glue_product(glue, many[-1:], parts, any_rows=True)[0])


@needs_cc
def test_an_eagle3_tap_gives_a_row_its_bits_whatever_rows_ride_with_it() -> None:
    """A stage's share of EAGLE-3's fc (``Stage._tap``) on the glue: a row's partial sum has the same bits alone, in
    two rows and in a wave of 33. A stage drops the rows pruned while they were in flight, which depends on timing;
    if the survivors' sums changed with their count (torch's fp32 product does at one or two rows), the head's
    scores, and so the step counts of a run, would depend on the machine's load."""
    source = resolve(None)
    h = int(source.raw["hidden_size"])
    g = torch.Generator().manual_seed(1)
    stage = Stage(source, 0, 2, weights="int4", taps={1: torch.randn(h, h, generator=g) / h**0.5})
    assert stage.glue is not None
    x = torch.randn(33, h, generator=g)
    wave = stage._tap(1, x, None)
    for lo, hi in ((0, 1), (0, 2), (5, 6)):
        assert torch.equal(stage._tap(1, x[lo:hi].contiguous(), None), wave[lo:hi])


def test_no_glue_where_turned_off_or_not_buildable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``HOMESPEC_NATIVE=0``: stages keep torch's operators. A compiler that fails: a clear error from ``build``,
    one notice from ``library`` and no glue (the stages fall back)."""
    monkeypatch.setenv("HOMESPEC_NATIVE", "0")
    assert native.library.__wrapped__() is None
    monkeypatch.setenv("HOMESPEC_NATIVE", "1")
    monkeypatch.setenv("HOMESPEC_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    with pytest.raises(RuntimeError, match="false failed"):
        native.build()
    assert native.library.__wrapped__() is None
    assert "native decode glue unavailable" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.so"))  # nothing half-written left in the cache


@needs_cc
def test_a_build_says_so_while_it_waits_and_happens_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stage that finds no built glue (a new version, a cleared cache) compiles it and says so on stderr while
    it waits; the next one loads the cached library, silently."""
    monkeypatch.setenv("HOMESPEC_CACHE", str(tmp_path))
    path = native.build()
    assert path.is_file() and path.is_relative_to(tmp_path)
    assert "compiling the native decode glue" in capsys.readouterr().err
    assert native.build() == path
    assert capsys.readouterr().err == ""


@needs_cc
def test_the_draft_head_through_the_glue_predicts_what_its_torch_forward_does(stages: tuple[Stage, Stage]) -> None:
    """The shipped head drafting through the glue (int8 products, ``DraftHead.use_glue``) against its fp32 torch
    forward on a real reply's features: the same next token for nearly every row, features within int8 rounding."""
    from homespec.model.drafts import SHIPPED_HEADS
    from homespec.model.head import load_head

    glued, _ = stages
    source = resolve(None)
    ids = source.tokenizer()(PROMPT)["input_ids"]
    ids = ids + greedy(glued, ids, 32)
    glued.forward_prefix(glued.new_cache(512, 16), torch.tensor(ids), range(len(ids)))
    feats = glued.last_hidden
    assert feats is not None
    path = sorted(SHIPPED_HEADS.glob("*.safetensors"))[0]
    plain, head = load_head(path, source.config), load_head(path, source.config)
    assert head.use_glue() and head.glued is not None and plain.glued is None
    n = len(ids) - 1  # the row for position q reads the token at q and the feature at q - 1
    emb, feat = glued.embed(torch.tensor(ids[1:])), feats[:-1]
    cos, sin = glued.rope(range(n))
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    with torch.inference_mode():
        want = plain.forward(emb, feat, cos, sin, mask)[0]
        got = head.run_cached(head.new_cache(512, 16, torch.float32, "cpu"), emb, feat, cos, sin, 0, mask)
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert float(cosine.min()) > 0.995  # an int8 fc gave 0.84 (its input holds the features' outliers)
    agree = (glued.logits(got).argmax(-1) == glued.logits(want).argmax(-1)).float().mean()
    assert float(agree) >= 0.95


@needs_cc
@pytest.mark.parametrize("out_dtype, kv_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_attention_gives_a_row_the_same_bits_wherever_its_keys_sit(
    out_dtype: torch.dtype, kv_dtype: torch.dtype
) -> None:
    """``hs_attend`` directly, random queries and keys: 1,000 rows that see the same 64 keys get the same bits when
    those are their only slots and when masked slots lie between them (a tree wave's others, in two layouts). What
    keeps a verified path's rows exact after its keys move from tree slots to the prefix. A one-ulp change of a
    softmax sum rarely moves a bf16 output, hence many rows: summing in lanes by slot fails this test. A quantized
    stage's outputs (bf16) over its fp32 cache, and a float stage's (fp32) over a bf16 one."""
    glue = native.library()
    assert glue is not None
    g = torch.Generator().manual_seed(0)
    rows, heads, kvh, d, seen = 1000, 9, 3, 64, 64
    q = torch.randn(rows, heads, d, generator=g)
    keys, values = torch.randn(kvh, seen, d, generator=g) * 3, torch.randn(kvh, seen, d, generator=g)

    def attend(slots: list[int], used: int) -> torch.Tensor:
        k, v = torch.randn(kvh, used, d, generator=g), torch.randn(kvh, used, d, generator=g)  # others' keys
        k[:, slots], v[:, slots] = keys, values
        k, v = k.to(kv_dtype), v.to(kv_dtype)
        mask = torch.zeros(rows, used, dtype=torch.uint8)
        mask[:, slots] = 1
        work = torch.empty(2 * rows * heads * used)
        out = torch.empty(rows, heads * d, dtype=out_dtype)
        glue.hs_attend(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr(), rows, heads, kvh, d, used, used, 0.125,
            work.data_ptr(), out.data_ptr(), int(out_dtype == torch.float32), int(kv_dtype == torch.float32),
        )  # fmt: skip
        return out

    alone = attend(list(range(seen)), seen)
    assert torch.equal(attend(sorted(torch.randperm(3 * seen, generator=g)[:seen].tolist()), 3 * seen), alone)
    assert torch.equal(attend([2 * i + 5 for i in range(seen)], 2 * seen + 7), alone)
