"""A pipeline stage: decoder layers ``[start, end)`` of a Llama-family model, built from only those tensors.

A stage optionally owns the token embeddings (the first stage) and the final norm + LM head (the last stage, or a
draft that exits early). It runs a **wave** of tree nodes over a ``TreeKVCache`` with the tree attention mask and
explicit positions (DESIGN §4.3), or a causal chunk of committed prefix tokens.

The math is a compact implementation of the Llama family (RMSNorm, RoPE with the config's scaling (``rope.py``),
grouped-query attention via SDPA with an explicit boolean mask, SwiGLU, optional q/k/v/o and MLP biases as in
Qwen2), checked against transformers' logits in the tests; with Qwen3's per-head q/k norms, Phi-3's fused
projections split at load, and Gemma 3 (``gemma3_text``): (1 + w) RMSNorms (folded into the weight at load, applied
in fp32 as transformers does), a norm after attention and after the MLP besides the two before, GeGLU (tanh),
embeddings scaled by √hidden, attention scaled by ``query_pre_attn_scalar``, and sliding-window attention with its
own RoPE base on the layers ``layer_types`` names ``sliding_attention`` (each key masked by its position,
``TreeKVCache.key_positions``). Mixture-of-experts layers (Qwen3-MoE, Mixtral; ``_Moe``) replace the MLP by a
router and experts: softmax over the router's logits in fp32, the top k, renormalized where the family does, and
each expert run once over the rows routed to it, their outputs summed in expert order as transformers does.

A Llama-family stage on the CPU (quantized, fp32 or bf16) runs its layers through the native glue
(``homespec/native``, ``_native_layers``): the same math with the rest of a layer in five C calls around its
products, each row on its own (so a row's bits do not depend on its wave). Quantized products run in torch's int4/int8
kernels; float products at a wave's few rows in the glue's own (``glue_product``), more rows in torch's; a bf16
stage keeps its residual stream in fp32 there. Torch's operators where the glue cannot build.

This module computes; it never decides which nodes to run, and knows nothing of sockets or drafts.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from homespec.core.step import DEFAULT_MAX_TREE
from homespec.core.tree import WaveRow
from homespec.errors import CapacityError, ConfigError, ModelError
from homespec.model.kv import TreeKVCache
from homespec.model.loader import ModelSource
from homespec.model.quant import (
    Int8Channel,
    Weight,
    bf16_kernel,
    bf16_product,
    compact,
    embedding,
    fuse_rows,
    linear,
    out_features,
    split_rows,
    weight_nbytes,
)


@dataclass(frozen=True)
class Segment:
    """One request's rows in a forward: its cache, where they are written, how many, and their mask
    [n, start + n]."""

    cache: TreeKVCache
    start: int
    n: int
    mask: torch.Tensor


@dataclass(frozen=True)
class Lockstep:
    """B sequences decoding together, one row each per forward, their keys in one tensor (``forward_lockstep``;
    train-draft's data): sequence b holds slots [pad[b], t) of k/v [layers, B, kvh, slots, d] (its prompt
    right-aligned at the first step), and this forward writes slot t for every sequence; the whole batch's
    attention is one call per layer instead of one per sequence."""

    k: torch.Tensor
    v: torch.Tensor
    pad: torch.Tensor  # [B] int64: the first slot each sequence uses
    t: int

    def mask(self) -> torch.Tensor:
        """[B, t + 1]: each sequence sees its own slots up to this one."""
        slots = torch.arange(self.t + 1, device=self.pad.device)
        return slots[None, :] >= self.pad[:, None]


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class _Moe:
    """A mixture-of-experts feed-forward block (Qwen3-MoE, Mixtral): ``router`` [experts, hidden] (kept float),
    and each expert's SwiGLU MLP."""

    router: torch.Tensor
    gate: list[Weight]  # [expert inter, hidden] each
    up: list[Weight]
    down: list[Weight]  # [hidden, expert inter]
    top_k: int
    normalize: bool  # the top k probabilities renormalized to sum to 1 (Mixtral always; Qwen3-MoE: norm_topk_prob)
    cast: bool  # the routing weights cast back to the activations' dtype before use (Qwen3-MoE)

    def weights(self) -> list[Weight]:
        return [self.router, *self.gate, *self.up, *self.down]


_STACKED = {"qkv": ("wq", "wk", "wv"), "gu": ("wg", "wu")}  # _Layer fields stacked into one weight


@dataclass
class _Layer:
    ln1: torch.Tensor  # [hidden]
    ln2: torch.Tensor  # [hidden]
    wq: Weight | None  # [heads * d, hidden]; a float tensor or a quantized weight (model/quant.py); None: in qkv
    wk: Weight | None  # [kv_heads * d, hidden]
    wv: Weight | None  # [kv_heads * d, hidden]
    wo: Weight  # [hidden, heads * d]
    wg: Weight | None = None  # [inter, hidden] (None in a mixture-of-experts layer: ``moe``)
    wu: Weight | None = None  # [inter, hidden]
    wd: Weight | None = None  # [hidden, inter]
    bq: torch.Tensor | None = None
    bk: torch.Tensor | None = None
    bv: torch.Tensor | None = None
    bo: torch.Tensor | None = None
    bg: torch.Tensor | None = None
    bu: torch.Tensor | None = None
    bd: torch.Tensor | None = None
    qn: torch.Tensor | None = None  # [d]: Qwen3's RMSNorm of each query head before RoPE
    kn: torch.Tensor | None = None  # [d]: the same for each key head
    pa: torch.Tensor | None = None  # [hidden]: Gemma 3's norm of the attention output (before the residual add)
    pf: torch.Tensor | None = None  # [hidden]: Gemma 3's norm of the MLP output
    moe: _Moe | None = None  # the MLP's place in a mixture-of-experts layer
    qkv: Weight | None = None  # wq, wk and wv stacked (quantized stages: ``fuse``); then those three are None
    gu: Weight | None = None  # wg and wu stacked, the same way

    def weights(self) -> list[Weight]:
        """Every tensor and weight the layer holds."""
        out = [w for k, w in vars(self).items() if k != "moe" and w is not None]
        return out + (self.moe.weights() if self.moe is not None else [])

    def fuse(self, rows: dict[str, int]) -> None:
        """Stack q/k/v and gate/up into one weight each where ``quant.fuse_rows`` can (quantized weights without
        biases): at one row a quantized product costs mostly its call and casts, so two calls per layer input save
        a millisecond a token on the bundled model (BENCHMARKS.md §6). ``rows``: each part's output rows."""
        for fused, parts in _STACKED.items():
            got = [getattr(self, k) for k in parts]
            if any(w is None for w in got) or any(getattr(self, "b" + k[1]) is not None for k in parts):
                continue
            stacked = fuse_rows(got)
            if stacked is not None and out_features(stacked) == sum(rows[k] for k in parts):
                setattr(self, fused, stacked)
                for k in parts:
                    setattr(self, k, None)

    def part(self, name: str, rows: dict[str, int]) -> Weight | None:
        """Weight ``name`` (wq, wk, wv, wg, wu…) as its own weight, split out of a stacked one where fused."""
        held: Weight | None = getattr(self, name)
        if held is not None:
            return held
        for fused, parts in _STACKED.items():
            w = getattr(self, fused)
            if name in parts and w is not None:
                return split_rows(w, [rows[k] for k in parts], fused)[parts.index(name)]
        return None


_LAYER_TENSORS = {
    "ln1": "input_layernorm.weight",
    "ln2": "post_attention_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "wg": "mlp.gate_proj.weight",
    "wu": "mlp.up_proj.weight",
    "wd": "mlp.down_proj.weight",
}
_LAYER_BIASES = {
    "bq": "self_attn.q_proj.bias",
    "bk": "self_attn.k_proj.bias",
    "bv": "self_attn.v_proj.bias",
    "bo": "self_attn.o_proj.bias",
    "bg": "mlp.gate_proj.bias",
    "bu": "mlp.up_proj.bias",
    "bd": "mlp.down_proj.bias",
}
_LAYER_HEAD_NORMS = {"qn": "self_attn.q_norm.weight", "kn": "self_attn.k_norm.weight"}  # Qwen3
#: Gemma 3's norms: its pre-MLP norm is ``pre_feedforward_layernorm`` and its ``post_attention_layernorm`` normalizes
#: the attention output (in Llama that name is the pre-MLP norm)
_GEMMA_NORMS = {
    "ln1": "input_layernorm.weight",
    "ln2": "pre_feedforward_layernorm.weight",
    "pa": "post_attention_layernorm.weight",
    "pf": "post_feedforward_layernorm.weight",
    **_LAYER_HEAD_NORMS,
}
GEMMA_TYPES = ("gemma3_text",)
#: mixture-of-experts families: the router's and each expert's tensor names (gate, up, down) under a layer
_MOE = {
    "qwen3_moe": ("mlp.gate.weight", "mlp.experts.{e}.{p}.weight", ("gate_proj", "up_proj", "down_proj")),
    "mixtral": ("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{e}.{p}.weight", ("w1", "w3", "w2")),
}
#: fused projections (Phi-3, Phi-4) and the weights their output rows split into, in order
_FUSED = {"self_attn.qkv_proj.weight": ("wq", "wk", "wv"), "mlp.gate_up_proj.weight": ("wg", "wu")}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}", hint=f"one of {', '.join(DTYPES)}")
    return DTYPES[name]


class Stage:
    """Layers ``[start, end)`` of ``source``; ``embed``/``head`` default to first/last stage. ``weights``: the
    linear weights' format (``formats.py``: a float format is ``dtype`` itself; ``int4``/``int8`` hold quantized
    weights behind ``quant.linear``, activations and KV in ``dtype``)."""

    def __init__(
        self,
        source: ModelSource,
        start: int,
        end: int,
        *,
        embed: bool | None = None,
        head: bool | None = None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        weights: str = "auto",
        taps: dict[int, torch.Tensor] | None = None,
        native: bool = True,
    ) -> None:
        shape = source.shape
        total = source.num_layers
        if not (0 <= start <= end <= total):
            raise ConfigError(f"layer range [{start}, {end}) is outside the model's {total} layers")
        self.source, self.start, self.end = source, start, end
        self.has_embed = start == 0 if embed is None else embed
        self.has_head = end == total if head is None else head
        self.dtype, self.device, self.weights = dtype, device, weights
        self.hidden, self.heads, self.kv_heads = shape.hidden, shape.heads, shape.kv_heads
        self.head_dim, self.vocab = shape.head_dim, shape.vocab
        self.eps = float(source.raw.get("rms_norm_eps", 1e-6))
        self._family_options(source.raw)
        self.layers = [self._load_layer(i) for i in range(start, end)]
        self.embed_w, self.norm_w, self.head_w = self._load_ends()
        # quantized weights (asked for, or the checkpoint's own): a row's bits independent of its wave (``attention``)
        held = [w for layer in self.layers for w in layer.weights()]
        self.invariant = any(not isinstance(w, torch.Tensor) for w in held)
        self.rotary = self._rotary()
        self.last_hidden: torch.Tensor | None = None  # stages with a head: features of the last call's rows
        # an EAGLE-3 head's fc columns [hidden, hidden] for the layers of this stage whose incoming stream it reads
        # (model/eagle.py): every call adds their products into ``last_carry``, the running sum of fc
        self.taps = {i: w.to(device=device, dtype=torch.float32) for i, w in (taps or {}).items()}
        if any(not start <= i < end for i in self.taps):
            raise ConfigError(f"EAGLE-3 feature layers {sorted(self.taps)} are not all in [{start}, {end})")
        self.last_carry: torch.Tensor | None = None  # [n, hidden] fp32: fc's sum so far, after the last call
        # layers whose incoming streams every call keeps, concatenated in this order in ``last_streams`` [n, k *
        # hidden] (``train-draft --eagle3``: what an EAGLE-3 head's fc reads, recorded as the data is decoded)
        self.record: tuple[int, ...] = ()
        self.last_streams: torch.Tensor | None = None
        self._streams: dict[int, torch.Tensor] = {}
        self.glue_shape = GlueShape(
            self.heads, self.kv_heads, self.head_dim, self.eps, self.attn_scale, self.part_rows["wg"]
        )
        self.glue: Any = None  # homespec/native: this stage's layers in native calls (``_glue``)
        self.glue_io: torch.dtype | None = None  # the glue's product dtype
        self.glued_layers: list[_Layer] = []  # the layers as the glue reads them (norms in fp32)
        if native:
            self._glue()

    def _glue(self) -> None:
        """Run this stage's layers through the native glue (``homespec.native``) where they fit it (``glue_io``): a
        Llama-family stage on the CPU in fp32 or bf16, its weights quantized (int4, int8) or float (Gemma 3, Qwen3,
        mixtures of experts, fp16 and layers with biases run torch operators)."""
        if self.device != "cpu" or self.dtype not in (torch.float32, torch.bfloat16) or self.gemma:
            return
        layers = [replace(w, ln1=w.ln1.float(), ln2=w.ln2.float()) for w in self.layers]
        io = glue_io(self.glue_shape, layers)
        if io is None:
            return
        from homespec.native import library

        self.glue = library()
        if self.glue is not None:
            self.glue_io, self.glued_layers = io, layers

    # -- loading -------------------------------------------------------------------------------------------
    def _family_options(self, raw: dict[str, Any]) -> None:
        """What differs from Llama in ``raw``'s family (Gemma 3: module docstring), checked before any weight loads."""
        self.gemma = raw.get("model_type") in GEMMA_TYPES
        self.act = F.silu
        self.attn_scale: float | None = None  # None: SDPA's 1 / sqrt(head_dim)
        self.embed_scale: float | None = None
        self.final_softcap: float | None = None
        self.sliding = [False] * (self.end - self.start)
        self.window = 0
        if not self.gemma:
            return
        act = raw.get("hidden_activation") or raw.get("hidden_act")
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ModelError(f"{self.source.name}: activation {act!r} is not supported (gelu_pytorch_tanh is)")
        if raw.get("attn_logit_softcapping") is not None:
            raise ModelError(f"{self.source.name}: attention logit soft-capping is not supported (Gemma 2 has it)")
        self.act = functools.partial(F.gelu, approximate="tanh")
        self.attn_scale = float(raw["query_pre_attn_scalar"]) ** -0.5
        self.embed_scale = float(self.hidden) ** 0.5
        self.final_softcap = raw.get("final_logit_softcapping")
        types = list(raw.get("layer_types") or [])
        self.sliding = [
            types[i] == "sliding_attention" if i < len(types) else False for i in range(self.start, self.end)
        ]
        if any(self.sliding):
            self.window = int(raw["sliding_window"])

    def _load_layer(self, i: int) -> _Layer:
        prefix = f"model.layers.{i}."
        fused = {f: parts for f, parts in _FUSED.items() if self.source.has(prefix + f)}  # Phi-3: split at load
        split = {k for parts in fused.values() for k in parts}
        tensors = {**_LAYER_TENSORS, **_GEMMA_NORMS} if self.gemma else _LAYER_TENSORS
        moe = self._load_moe(i)
        if moe is not None:
            split |= {"wg", "wu", "wd"}
        names = {k: prefix + v for k, v in tensors.items() if k not in split}
        optional = {**_LAYER_BIASES, **_LAYER_HEAD_NORMS}
        names.update({k: prefix + v for k, v in optional.items() if self.source.has(prefix + v)})
        read = [*names.values(), *(prefix + f for f in fused)]
        t = self.source.read_weights(read, self.weights, self.dtype, self.device)
        got: dict[str, Any] = {k: t[v] for k, v in names.items()}
        if moe is not None:
            got["moe"] = moe
        if self.gemma:
            got.update({k: self._gemma_norm(got[k]) for k in _GEMMA_NORMS if got.get(k) is not None})
        rows = self.part_rows
        for f, parts in fused.items():
            pieces = split_rows(t[prefix + f], [rows[k] for k in parts], f"{prefix}{f}")
            got.update(zip(parts, (compact(p) for p in pieces), strict=True))
        layer = _Layer(**got)
        layer.fuse(rows)
        return layer

    @property
    def part_rows(self) -> dict[str, int]:
        """Output rows of each stackable projection (``_Layer.fuse``, ``_Layer.part``)."""
        d, inter = self.head_dim, int(self.source.shape.intermediate)
        return {"wq": self.heads * d, "wk": self.kv_heads * d, "wv": self.kv_heads * d, "wg": inter, "wu": inter}

    def _load_moe(self, i: int) -> _Moe | None:
        """Layer ``i``'s mixture-of-experts block, or None where the layer has a dense MLP (all of a dense model's;
        a Qwen3-MoE layer in ``mlp_only_layers`` or off its ``decoder_sparse_step``)."""
        raw = self.source.raw
        family = raw.get("model_type")
        if family not in _MOE:
            return None
        experts = int(raw.get("num_experts") or raw.get("num_local_experts") or 0)
        if family == "qwen3_moe":
            step = int(raw.get("decoder_sparse_step") or 1)
            if experts == 0 or i in (raw.get("mlp_only_layers") or []) or (i + 1) % step:
                return None
        router, expert, parts = _MOE[family]
        prefix = f"model.layers.{i}."
        names = [prefix + expert.format(e=e, p=p) for p in parts for e in range(experts)]
        t = self.source.read_weights([prefix + router], "auto", self.dtype, self.device)  # the router stays float
        w = self.source.read_weights(names, self.weights, self.dtype, self.device)
        gate, up, down = ([w[prefix + expert.format(e=e, p=p)] for e in range(experts)] for p in parts)
        r = t[prefix + router]
        assert isinstance(r, torch.Tensor)
        normalize = family == "mixtral" or bool(raw.get("norm_topk_prob", False))
        return _Moe(r, gate, up, down, int(raw["num_experts_per_tok"]), normalize, cast=family == "qwen3_moe")

    def _load_ends(self) -> tuple[Weight | None, torch.Tensor | None, Weight | None]:
        want = []
        if self.has_embed or (self.has_head and self.source.tied_embeddings):
            want.append("model.embed_tokens.weight")
        if self.has_head:
            want.append("model.norm.weight")
            if not self.source.tied_embeddings:
                want.append("lm_head.weight")
        t = self.source.read_weights(want, self.weights, self.dtype, self.device)
        embed = t.get("model.embed_tokens.weight")
        head = t.get("lm_head.weight", embed) if self.has_head else None
        norm = t.get("model.norm.weight")
        assert norm is None or isinstance(norm, torch.Tensor)
        if norm is not None and self.gemma:
            norm = self._gemma_norm(norm)
        return (embed if self.has_embed else None), norm, head

    @staticmethod
    def _gemma_norm(w: Any) -> torch.Tensor:
        """Gemma's RMSNorm scales by (1 + w), computed in fp32 (as transformers does): folded here, kept fp32."""
        assert isinstance(w, torch.Tensor)
        return 1.0 + w.float()

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights this stage holds (a tied embedding and head counted once)."""
        seen: dict[int, int] = {}
        for layer in self.layers:
            for w in layer.weights():
                seen[id(w)] = weight_nbytes(w)
        for end in (self.embed_w, self.norm_w, self.head_w):
            if end is not None:
                seen[id(end)] = weight_nbytes(end)
        return sum(seen.values())

    def _rotary(self) -> Any:
        from homespec.model.rope import rope_parameters, rotary_for

        raw = self.source.raw
        partial = rope_parameters(raw).get("partial_rotary_factor", raw.get("partial_rotary_factor")) or 1.0
        if float(partial) != 1.0:
            raise ModelError(
                f"{self.source.name}: partial rotary embeddings (factor {partial}) are not supported yet",
                hint="models that rotate every head dimension run (Llama, Mistral, Qwen2/3, Phi-3/4, Gemma 3)",
            )
        config = lambda: self.source.config  # noqa: E731 (transformers' rotary module, for the types rope.py lacks)
        self.local_rotary: Any = None
        if self.gemma:  # transformers 5 keeps one rope per layer type: {"sliding_attention": {...}, ...}
            per_type = dict(raw.get("rope_parameters") or {})
            if "full_attention" in per_type:
                self.local_rotary = rotary_for(
                    {**raw, "rope_parameters": per_type["sliding_attention"]}, config, self.device
                )
                return rotary_for({**raw, "rope_parameters": per_type["full_attention"]}, config, self.device)
            local = {"rope_type": "default", "rope_theta": float(raw.get("rope_local_base_freq", 10000.0))}
            self.local_rotary = rotary_for({**raw, "rope_parameters": local}, config, self.device)
        return rotary_for(raw, config, self.device)

    # -- caches --------------------------------------------------------------------------------------------
    def new_cache(self, max_context: int = 4096, max_tree: int = DEFAULT_MAX_TREE) -> TreeKVCache:
        return TreeKVCache(
            len(self.layers), self.kv_heads, self.head_dim, max_context, max_tree, self.dtype, self.device
        )

    # -- running -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward_prefix(
        self, cache: TreeKVCache, x: torch.Tensor, positions: Sequence[int], carry: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Append committed tokens (a causal chunk). x: token ids [n] or hidden [n, hidden]; ``carry``: the
        previous stage's ``last_carry`` (EAGLE-3's running fc sum), if any."""
        start, mask = cache.reserve_prefix(len(positions))
        return self._run([Segment(cache, start, len(positions), mask)], x, positions, carry)

    @torch.inference_mode()
    def forward_tree(
        self, cache: TreeKVCache, rows: Sequence[WaveRow], x: torch.Tensor, carry: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run a wave of tree nodes. Returns hidden [n, hidden], or logits [n, vocab] if this stage has a head."""
        return self._run([self.segment(cache, rows)], x, [r.position for r in rows], carry)

    @staticmethod
    def segment(cache: TreeKVCache, rows: Sequence[WaveRow]) -> Segment:
        """Reserve ``rows``' tree slots in one request's cache, for ``forward_batch``. A row placed past the
        cache's context (a head that lies, or a bug) fails the request before anything is computed."""
        past = [r.position for r in rows if not 0 <= r.position < cache.max_prefix]
        if past:
            raise CapacityError(f"position {past[0]} is past this cache's context of {cache.max_prefix} tokens")
        start, mask = cache.reserve_tree([r.node for r in rows], [r.parent for r in rows])
        return Segment(cache, start, len(rows), mask)

    @torch.inference_mode()
    def forward_batch(
        self,
        segments: Sequence[Segment],
        x: torch.Tensor,
        positions: Sequence[int],
        carry: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The waves of several requests as one forward (SpecPipe-DB): rows are the segments' rows in order; the
        projections and the MLP run once over all of them, attention per request over its own cache."""
        return self._run(segments, x, positions, carry)

    @torch.inference_mode()
    def forward_lockstep(self, batch: Lockstep, x: torch.Tensor) -> torch.Tensor:
        """One row per sequence of ``batch`` (token ids or hidden [B]), at slot ``batch.t``; logits or hidden [B]."""
        return self._run(batch, x, (batch.t - batch.pad).tolist())

    @torch.inference_mode()
    def forward_from(
        self, first: int, segments: Sequence[Segment], h: torch.Tensor, positions: Sequence[int]
    ) -> torch.Tensor:
        """This stage's layers ``first`` .. (an index into its layers) over the residual streams h [n, hidden]
        entering layer ``first`` (as ``record`` keeps them): the last hidden states [n, hidden], before any final
        norm (no taps, records or head). A draft head's trainer (``train_head.soft_targets``) gets the target's
        whole next-token distribution this way from the last stream its data recorded."""
        if not 0 <= first < len(self.layers):
            raise ValueError(f"layer {first} is not in this stage's {len(self.layers)} layers")
        return self._run(segments, h, positions, first=first)

    def _run(
        self,
        segments: Sequence[Segment] | Lockstep,
        x: torch.Tensor,
        positions: Sequence[int],
        carry: torch.Tensor | None = None,  # [n, hidden] fp32: EAGLE-3's fc sum from the stages before
        first: int = 0,  # the layer x enters (``forward_from``; > 0: x is that layer's incoming stream)
    ) -> torch.Tensor:
        embed = self.has_embed and first == 0
        h = self.embed(x) if embed else x.to(device=self.device, dtype=self.dtype)  # [n, hidden]
        acc = None if carry is None else carry.to(device=self.device, dtype=torch.float32)
        masks = [segments.mask()] if isinstance(segments, Lockstep) else [seg.mask for seg in segments]
        full = (*self.rope(positions), masks)
        local = full
        if any(self.sliding):
            if isinstance(segments, Lockstep):  # a key's position is its slot minus the sequence's pad
                back = segments.t - torch.arange(segments.t + 1, device=self.device)
                windowed = [masks[0] & (back < self.window)[None, :]]
            else:
                windowed = self._windowed(segments, positions)
            local = (*self.rope(positions, self.local_rotary), windowed)
        if first:
            for li in range(first, len(self.layers)):
                cos, sin, masks = local if self.sliding[li] else full
                h = self._layer(self.layers[li], li, h, segments, cos, sin, masks)
        elif self.glue is not None and not isinstance(segments, Lockstep):
            h, acc = self._native_layers(h, segments, full[0], full[1], acc)
        else:
            for li, layer in enumerate(self.layers):
                acc = self._tap(li, h, acc)
                cos, sin, masks = local if self.sliding[li] else full
                h = self._layer(layer, li, h, segments, cos, sin, masks)
        self.last_carry = acc
        if self.record and not first:
            self.last_streams = torch.cat([self._streams.pop(i) for i in self.record], dim=-1)
        if self.has_head and not first:
            self.last_hidden = h  # the target's feature (before the final norm), for a draft head
            return self.logits(h)  # [n, vocab]
        return h

    def _tap(self, li: int, h: torch.Tensor, acc: Any) -> Any:
        """EAGLE-3's running fc sum after adding layer ``li``'s incoming stream through its columns of fc, if tapped;
        the stream kept for ``last_streams`` if recorded (a copy: the native glue updates its stream in place)."""
        if self.start + li in self.record:
            self._streams[self.start + li] = h.clone()
        tap = self.taps.get(self.start + li)
        if tap is None:
            return acc
        if self.glue is not None and _glue_weight(tap) is torch.float32:
            # a row's bits whatever rows ride with it: a stage drops the rows pruned while in flight, which depends
            # on timing, and torch's fp32 product of a row changes its last bits with the row count (1 or 2 rows
            # here), which would reach the head's scores and make the step counts depend on the machine's load
            part = glue_product(self.glue, h.float().contiguous(), [tap], any_rows=True)
        else:
            part = F.linear(h.float(), tap)
        return part if acc is None else acc + part

    def _native_layers(
        self, h: torch.Tensor, segments: Sequence[Segment], cos: torch.Tensor, sin: torch.Tensor, acc: Any
    ) -> tuple[torch.Tensor, Any]:
        """The layers through the native glue (``_glue``, ``glue_layers``); EAGLE-3's taps read each layer's input."""
        carry = [acc]

        def tap(li: int, x: torch.Tensor) -> None:
            carry[0] = self._tap(li, x, carry[0])

        assert self.glue_io is not None  # set with ``glue``
        out = glue_layers(self.glue, self.glue_shape, self.glued_layers, h, segments, cos, sin, tap, self.glue_io)
        return out.to(self.dtype), carry[0]

    def _windowed(self, segments: Sequence[Segment], positions: Sequence[int]) -> list[torch.Tensor]:
        """The segments' masks for sliding-window layers: a row at position p sees a key at position j only when
        p - j < window (as transformers masks it), with the keys' positions from ``TreeKVCache.key_positions``."""
        out, a = [], 0
        for seg in segments:
            pos = torch.tensor(list(positions[a : a + seg.n]), device=self.device)[:, None]  # [n, 1]
            keys = seg.cache.key_positions(seg.mask.shape[1])[None, :]  # [1, T]
            out.append(seg.mask & (pos - keys < self.window))
            a += seg.n
        return out

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [n] -> embeddings [n, hidden] (a stage with embeddings; Gemma's scaled by √hidden)."""
        assert self.embed_w is not None
        h = embedding(ids.to(self.device), self.embed_w).to(self.dtype)
        return h if self.embed_scale is None else h * torch.tensor(self.embed_scale, dtype=h.dtype)

    def rope(self, positions: Sequence[int], rotary: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary cos and sin [n, head_dim] for absolute positions (``rotary``: another base, Gemma's local)."""
        pos = torch.tensor([list(positions)], device=self.device)  # [1, n]
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        cos, sin = (rotary or self.rotary)(probe, pos)  # [1, n, d] each
        return cos[0], sin[0]

    def logits(self, h: torch.Tensor, head_w: Weight | None = None, normed: bool = False) -> torch.Tensor:
        """Features [n, hidden] -> logits [n, vocab] through the final norm and LM head (a stage with a head);
        ``head_w``: some of the LM head's rows (a draft vocabulary), for logits over those tokens only;
        ``normed``: h is already after the final norm (EAGLE-1's features)."""
        assert self.head_w is not None
        x, w = h if normed else self.final_norm(h), self.head_w if head_w is None else head_w
        io = _glue_weight(w) if self.glue is not None else None
        few = x.shape[0] <= NATIVE_ROWS and isinstance(w, torch.Tensor)
        if io is not None and (isinstance(w, Int8Channel) or few):  # the glue's own products (``glue_product``)
            out = glue_product(self.glue, x.to(io).contiguous(), [w]).to(x.dtype)
        else:
            out = linear(x, w)
        if self.final_softcap:
            out = torch.tanh(out / self.final_softcap) * self.final_softcap
        return out

    def _layer(
        self,
        w: _Layer,
        li: int,
        h: torch.Tensor,  # [n, hidden]
        segments: Sequence[Segment] | Lockstep,
        cos: torch.Tensor,  # [n, d]
        sin: torch.Tensor,  # [n, d]
        masks: Sequence[torch.Tensor],  # per segment (the window's, on a sliding layer)
    ) -> torch.Tensor:
        n = h.shape[0]
        r = self._rms(h, w.ln1)
        qd, kd = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if w.qkv is not None:
            q, k, v = linear(r, w.qkv).split([qd, kd, kd], dim=-1)
        else:
            assert w.wq is not None and w.wk is not None and w.wv is not None
            q, k, v = linear(r, w.wq, w.bq), linear(r, w.wk, w.bk), linear(r, w.wv, w.bv)
        q = q.reshape(n, self.heads, self.head_dim).transpose(0, 1)  # [H, n, d]
        k = k.reshape(n, self.kv_heads, self.head_dim).transpose(0, 1)  # [kvh, n, d]
        v = v.reshape(n, self.kv_heads, self.head_dim).transpose(0, 1)  # [kvh, n, d]
        if w.qn is not None and w.kn is not None:  # Qwen3: each head's query and key normalized before RoPE
            q, k = self._rms(q, w.qn), self._rms(k, w.kn)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if isinstance(segments, Lockstep):
            attn = self._lockstep_attention(segments, li, q, k, v, masks[0])
        else:
            outs, a = [], 0
            for seg, seg_mask in zip(segments, masks, strict=True):
                b, start, cache = a + seg.n, seg.start, seg.cache
                cache.k[li, :, start : start + seg.n] = k[:, a:b]
                cache.v[li, :, start : start + seg.n] = v[:, a:b]
                used = start + seg.n
                keys, values = cache.k[li, :, :used], cache.v[li, :, :used]  # [kvh, used, d]
                outs.append(attention(q[:, a:b], keys, values, seg_mask, self.invariant, self.attn_scale))
                a = b
            attn = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # [H, n, d]
        o = linear(attn.transpose(0, 1).reshape(n, -1), w.wo, w.bo)
        h = h + (o if w.pa is None else self._rms(o, w.pa))
        r = self._rms(h, w.ln2)
        if w.moe is not None:
            m = self._experts(r, w.moe)
        elif w.gu is not None:
            assert w.wd is not None
            g, u = linear(r, w.gu).chunk(2, dim=-1)
            m = linear(self.act(g) * u, w.wd, w.bd)
        else:
            assert w.wg is not None and w.wu is not None and w.wd is not None
            m = linear(self.act(linear(r, w.wg, w.bg)) * linear(r, w.wu, w.bu), w.wd, w.bd)
        return h + (m if w.pf is None else self._rms(m, w.pf))

    def _lockstep_attention(
        self, batch: Lockstep, li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """q [H, B, d], this step's k/v [kvh, B, d] written at slot t; attention of every sequence in one call per
        layer: each key head's group of query heads rides as that head's query rows (one row per sequence)."""
        t, kvh, d = batch.t, self.kv_heads, self.head_dim
        n, group = q.shape[1], self.heads // self.kv_heads
        batch.k[li, :, :, t] = k.transpose(0, 1)
        batch.v[li, :, :, t] = v.transpose(0, 1)
        wide = torch.float64 if self.invariant else q.dtype
        keys, values = batch.k[li, :, :, : t + 1], batch.v[li, :, :, : t + 1]  # [B, kvh, T, d]
        qb = q.view(kvh, group, n, d).permute(2, 0, 1, 3)  # [B, kvh, group, d]: head h reads key head h // group
        bias = torch.zeros(mask.shape, dtype=wide, device=mask.device).masked_fill_(~mask, float("-inf"))
        out = F.scaled_dot_product_attention(  # an additive mask: ~20% faster than a boolean one here
            qb.to(wide), keys.to(wide), values.to(wide), attn_mask=bias[:, None, None, :], scale=self.attn_scale
        )  # [B, kvh, group, d]
        return out.permute(1, 2, 0, 3).reshape(self.heads, n, d).to(q.dtype)

    def _experts(self, x: torch.Tensor, moe: _Moe) -> torch.Tensor:
        """A mixture-of-experts block over rows x [n, hidden]: each row's top-k experts by the router's softmax
        (fp32), each expert run once over all the rows routed to it, its outputs weighted and added per row in
        expert order (as transformers does, so the sums round alike)."""
        logits = F.linear(x, moe.router)  # [n, experts]
        top, index = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), moe.top_k, dim=-1)  # [n, k]
        if moe.normalize:
            top = top / top.sum(dim=-1, keepdim=True)
        if moe.cast:
            top = top.to(logits.dtype)
        out = torch.zeros_like(x)
        for e in torch.unique(index).tolist():  # ascending
            slot, rows = torch.where(index.t().eq(e))  # [k, n] -> (which of a row's k, the row)
            xs = x[rows]
            y = linear(self.act(linear(xs, moe.gate[e])) * linear(xs, moe.up[e]), moe.down[e])
            out.index_add_(0, rows, (y * top[rows, slot, None]).to(out.dtype))
        return out

    def features(self, taps: bool) -> torch.Tensor | None:
        """What a draft head reads after the last call (a stage with a head): the last hidden states, or with
        ``taps`` EAGLE-3's fc sum (``last_carry``)."""
        return self.last_carry if taps else self.last_hidden

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        """The target's final norm (a stage with a head): last hidden states [n, hidden] as its LM head reads them."""
        return self._rms(h, self.norm_w)

    def _rms(self, h: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        assert weight is not None
        return rms_norm(h, weight, self.eps, weight_in_fp32=self.gemma)  # Gemma: (1 + w), folded at load


#: A row must get the same bits whatever wave it rides in, however long the cache it attends over is and wherever
#: its keys sit in it (a tree node's ancestors are scattered over the tree slots; in ``ar`` the same keys are
#: contiguous): quantized stages cast each product's input to bf16 and get bf16 products back, which turns any
#: last-bit difference into a visible logit difference (0.125 steps at a logit of 16; fp32 weights: 5e-5). Only the
#: attention depends on those (its sums run in an order set by the rows' and keys' slots); the products, norms and
#: RoPE give a row the same bits whatever its companions (tests/test_quant.py, test_stage.py). So a quantized stage
#: (``invariant``) computes attention in fp64: two orders of the same sums differ there by ~1e-16, and the result
#: rounded to the activations' dtype comes out the same unless it lies within that of a rounding boundary (about
#: 2e-8 of fp32 values), which no test run has met. Its cost: the span of keys cast to fp64 per layer and step (at a
#: few hundred tokens, well under the products' time; it grows with the context); the native glue's attention gets
#: the same by its fixed order. Float stages on torch's operators keep their own dtype: they differ anyway by the
#: last bits of their float products, which change with the row count (the near-tie excuses of the lossless checks
#: against transformers); on the glue their rows' products are independent of the wave up to ``NATIVE_ROWS`` rows.


@dataclass(frozen=True)
class GlueShape:
    """What the native glue needs to know of a Llama layer besides its weights."""

    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    scale: float | None  # None: 1 / sqrt(head_dim)
    inter: int  # the MLP's width


#: rows up to which the glue's own float products (``glue_product``) run: torch's fp32 kernels cost 2-4x theirs at
#: decoding's few rows on the CPUs measured, its bf16 ones ~2.5x; from ~24 rows torch's blocked kernels win
#: (BENCHMARKS.md §6)
NATIVE_ROWS = 16


def _glue_weight(w: Weight | None) -> torch.dtype | None:
    """The dtype of a product's input and output where ``glue_product`` takes weight ``w``, else None: a quantized
    weight with a bf16 CPU kernel (``quant.bf16_kernel``; int8 codes contiguous, their input width a multiple of 32),
    or a contiguous fp32 or bf16 CPU tensor whose input width the glue's products take (a multiple of 32)."""
    if w is None:
        return None
    if isinstance(w, Int8Channel):
        fits = w.codes.is_contiguous() and w.scales.is_contiguous() and w.in_features % 32 == 0
        return torch.bfloat16 if fits and bf16_kernel(w) else None
    if not isinstance(w, torch.Tensor):
        return torch.bfloat16 if bf16_kernel(w) else None
    fits = w.device.type == "cpu" and w.dim() == 2 and w.is_contiguous() and w.shape[1] % 32 == 0
    return w.dtype if fits and w.dtype in (torch.float32, torch.bfloat16) else None


def glue_io(shape: GlueShape, layers: Sequence[_Layer]) -> torch.dtype | None:
    """The dtype (bf16 or fp32) of every product's input and output where ``glue_layers`` runs these layers, else
    None. It runs them where every product is one ``glue_product`` takes, all of one dtype (q/k/v and gate/up
    stacked or apart), the norms fp32, no biases or extra norms, heads the glue's attention takes."""
    d = shape.head_dim
    if d % 16 or d > 512 or shape.heads // shape.kv_heads > 16 or not layers:
        return None  # glue.c's attention: 16 lanes per dot product
    kinds = set()
    for layer in layers:
        if not all(t.dtype == torch.float32 and t.is_contiguous() for t in (layer.ln1, layer.ln2)):
            return None
        qkv = [layer.qkv] if layer.qkv is not None else [layer.wq, layer.wk, layer.wv]
        gu = [layer.gu] if layer.gu is not None else [layer.wg, layer.wu]
        kinds |= {_glue_weight(w) for w in (*qkv, layer.wo, *gu, layer.wd)}
        extras = (layer.bq, layer.bk, layer.bv, layer.bo, layer.bg, layer.bu, layer.bd)
        if any(x is not None for x in (*extras, layer.qn, layer.kn, layer.pa, layer.pf, layer.moe)):
            return None
    return kinds.pop() if len(kinds) == 1 and None not in kinds else None


def glue_product(glue: Any, x: torch.Tensor, parts: Sequence[Weight | None], any_rows: bool = False) -> torch.Tensor:
    """x [n, in] (contiguous, ``glue_io``'s dtype) through ``parts`` (weights ``_glue_weight`` takes, of one input):
    their outputs side by side [n, sum of outs]. int8 weights in the glue's own products, float ones there at up to
    ``NATIVE_ROWS`` rows (each output one dot product in a fixed order: a row's bits whatever its companions), more
    rows in torch's kernels (``any_rows``: float ones there too at any row count, for a row's bits whatever its
    wave); int4 ones in torch's (``quant.bf16_product``). int8 stays native at any row count, where torch's int8
    kernel costs 0.9-1.3x as much (BENCHMARKS.md §6), so that a row's bits never depend on its wave (as int4's
    kernel gives them)."""
    n = x.shape[0]
    native = all(isinstance(w, Int8Channel) for w in parts)
    few = n <= NATIVE_ROWS or any_rows
    native = native or (few and all(isinstance(w, (torch.Tensor, Int8Channel)) for w in parts))
    if not native:
        outs = [F.linear(x, w) if isinstance(w, torch.Tensor) else bf16_product(x, w) for w in parts if w is not None]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    width = sum(out_features(w) for w in parts if w is not None)
    y = torch.empty(n, width, dtype=x.dtype)
    int8 = any(isinstance(w, Int8Channel) for w in parts)
    scratch = torch.empty(n * x.shape[1] if int8 else 0)  # hs_linear_i8's input widened to fp32
    col = 0
    for w in parts:
        at = y.data_ptr() + col * y.element_size()
        if isinstance(w, Int8Channel):
            glue.hs_linear_i8(
                x.data_ptr(), w.codes.data_ptr(), w.scales.data_ptr(), n, w.in_features, w.out_features, at, width,
                scratch.data_ptr(),
            )  # fmt: skip
        else:
            assert isinstance(w, torch.Tensor)
            fn = glue.hs_linear_f32 if x.dtype == torch.float32 else glue.hs_linear_bf16
            fn(x.data_ptr(), w.data_ptr(), n, w.shape[1], w.shape[0], at, width)
        col += out_features(w)
    return y


def glue_layers(
    glue: Any,
    shape: GlueShape,
    layers: Sequence[_Layer],
    h: torch.Tensor,
    segments: Sequence[Segment],
    cos: torch.Tensor,
    sin: torch.Tensor,
    tap: Any = None,
    io: torch.dtype = torch.bfloat16,
    qkv_add: torch.Tensor | None = None,
) -> torch.Tensor:
    """Llama layers (``glue_io``) through the native glue (``homespec.native``): per layer the products
    (``glue_product``, inputs and outputs of dtype ``io``) and five native calls around them (norm, RoPE and the
    cache writes, attention per segment, SwiGLU, the residual adds with the next norm). Same math as
    ``Stage._layer``, one row at a time, the residual stream in fp32 (a bf16 stage's too); h [n, hidden] in, the
    fp32 stream after the last layer out; layer i reads each segment's ``cache.k[i]`` (fp32 or bf16). ``tap(i, h)``
    sees the stream entering layer i (EAGLE-3's taps); ``qkv_add`` [n, (heads + 2 kvh) d] is added to the first
    layer's q/k/v (an EAGLE-3 head's: the part its embedding half reads, ``eagle.EagleHead.use_glue``)."""
    n, hidden = h.shape
    heads, kvh, d = shape.heads, shape.kv_heads, shape.head_dim
    f32 = int(io == torch.float32)
    h = h.to(torch.float32, copy=True).contiguous()  # updated in place by the glue
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    r = torch.empty(n, hidden, dtype=io)  # the next product's input
    q = torch.empty(n, heads, d)
    a = torch.empty(n, heads * d, dtype=io)
    act = torch.empty(n, shape.inter, dtype=io)  # SwiGLU's output
    masks = [seg.mask.contiguous().view(torch.uint8) for seg in segments]
    work = torch.empty(2 * heads * max(seg.n * (seg.start + seg.n) for seg in segments))  # hs_attend's scratch
    scale = shape.scale if shape.scale is not None else d**-0.5
    glue.hs_rms(h.data_ptr(), layers[0].ln1.data_ptr(), n, hidden, shape.eps, r.data_ptr(), f32)
    for li, w in enumerate(layers):
        if tap is not None:
            tap(li, h)
        qkv = glue_product(glue, r, [w.qkv] if w.qkv is not None else [w.wq, w.wk, w.wv])
        if qkv_add is not None and li == 0:
            qkv += qkv_add
        row = 0
        for seg, mask in zip(segments, masks, strict=True):
            k, v = seg.cache.k[li], seg.cache.v[li]  # [kvh, slots, d], contiguous
            kv32 = int(k.dtype == torch.float32)
            glue.hs_rope_store(
                qkv[row].data_ptr(), cos[row].data_ptr(), sin[row].data_ptr(), seg.n, heads, kvh, d,
                q[row].data_ptr(), k.data_ptr(), v.data_ptr(), k.shape[1], seg.start, f32, kv32,
            )  # fmt: skip
            glue.hs_attend(
                q[row].data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr(), seg.n, heads, kvh, d,
                k.shape[1], seg.start + seg.n, scale, work.data_ptr(), a[row].data_ptr(), f32, kv32,
            )  # fmt: skip
            row += seg.n
        o = glue_product(glue, a, [w.wo])
        glue.hs_add_rms(h.data_ptr(), o.data_ptr(), w.ln2.data_ptr(), n, hidden, shape.eps, r.data_ptr(), f32)
        gu = glue_product(glue, r, [w.gu] if w.gu is not None else [w.wg, w.wu])
        glue.hs_silu_mul(gu.data_ptr(), n, shape.inter, act.data_ptr(), f32)
        down = glue_product(glue, act, [w.wd])
        last = li + 1 == len(layers)
        norm = None if last else layers[li + 1].ln1.data_ptr()
        out = None if last else r.data_ptr()
        glue.hs_add_rms(h.data_ptr(), down.data_ptr(), norm, n, hidden, shape.eps, out, f32)
    return h


def attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    invariant: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Grouped-query attention of one request's rows: q [H, n, d] over keys/values [kvh, T, d] with mask [n, T]
    -> [H, n, d]; ``invariant``: in fp64, so that a row gets the same bits whatever the other rows and wherever its
    keys sit (the comment above); ``scale``: of the scores (None: 1 / sqrt(d))."""
    wide = torch.float64 if invariant else q.dtype
    out = F.scaled_dot_product_attention(
        q.to(wide)[None],
        keys.to(wide)[None],
        values.to(wide)[None],
        attn_mask=mask[None, None],
        enable_gqa=True,
        scale=scale,
    )
    return out[0].to(q.dtype)


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float, weight_in_fp32: bool = False) -> torch.Tensor:
    """Llama's RMSNorm: normalized in fp32, scaled by ``weight`` after the cast back; ``weight_in_fp32``: Gemma's,
    scaled in fp32 before the cast (as transformers computes each)."""
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (x * weight).to(h.dtype) if weight_in_fp32 else weight * x.to(h.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
