"""Published EAGLE draft heads (``--draft eagle:PATH``), read in their own layouts: EAGLE-1/2 and EAGLE-3.

**EAGLE-1/2** (SafeAILab/EAGLE ``cnets.py``): ``fc`` [H, 2H] with an optional bias, then one Llama decoder layer
(``layers.0.*``) whose input norm is skipped (the first layer of an EAGLE head has none). The row for the token at
position q reads ``fc([embed(x_q), f_{q-1}])`` at rotary position q - 1, where f is the target's last hidden state
*after* its final norm (what the base model returns); the layer's output is the predicted f_q, which the target's
LM head reads as it is, without a norm. A position the target computed has its true f, so the target's own
distribution there.

**EAGLE-3** (``fc`` [H, 3H] without bias; the layer as ``midlayer.*``, or ``layers.0.*`` in vllm-project/speculators
files; ``norm``; ``lm_head`` over a draft vocabulary with ``d2t``): the target's feature is fc over three residual
streams [s_a, s_b, s_c], s_i the stream *entering* layer i (transformers' ``hidden_states[i]``), with (a, b, c) =
(2, L // 2, L - 3) unless the config names them. The layer normalizes the embedding (``input_layernorm``) and the
feature (``hidden_norm``), attends over their concatenation [emb, feat] (q/k/v of width 2H), adds the attention
output to the feature (the residual; the normed feature with speculators' ``norm_before_residual``) and runs its
MLP. The output is the next level's feature as it is;
``lm_head(norm(.))`` gives logits over the draft vocabulary, draft id i being the target's token i + d2t[i].

A head of more than one layer (EAGLE-1's own ``num_hidden_layers``; for EAGLE-3 a HomeSpec extension,
``train-draft --head-layers``) runs each further layer ``layers.i.*`` as a plain Llama decoder layer (input norm,
attention of width H, MLP) over the one before, at the same positions; its KV cache holds one layer per head layer.

fc is linear without a bias: fc([s_a, s_b, s_c]) = W_a s_a + W_b s_b + W_c s_c. In a pipeline the three layers sit
on different stages, so each stage holding one adds its W_i s_i into a running H-wide sum that travels with the
activations (``tap_weights``, ``Stage(taps=...)``), and the last stage returns the sum as the request's features.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from homespec.errors import DraftError
from homespec.model.head import VOCAB_KEY, CachedRows, head_attention, target_fingerprint
from homespec.model.stage import rms_norm

_LAYER_PREFIXES = ("layers.0.", "midlayer.")
_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_FURTHER = re.compile(r"layers\.([1-9][0-9]*)\.")  # a head's layers after its first (EAGLE-1's own convention)


def _further_layers(tensors: Mapping[str, torch.Tensor]) -> set[int]:
    """The indices i >= 1 of the layers ``layers.i.*`` a head's tensors hold beside its first."""
    return {int(m[1]) for name in tensors if (m := _FURTHER.match(name))}


@dataclass(frozen=True)
class EagleConfig:
    version: int  # 1 (EAGLE-1/2: fc over [emb, post-norm feature]) or 3 (fc over three residual streams)
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    draft_vocab: int  # EAGLE-3: rows of its lm_head; EAGLE-1: 0 (the target's LM head)
    taps: tuple[int, ...] = ()  # EAGLE-3: the target layers whose incoming stream feeds fc, in fc's column order
    norm_before_residual: bool = False  # speculators' option: the residual is the feature after hidden_norm
    layers: int = 1  # decoder layers: the first as above, each further one a plain Llama layer (``layers.i.*``)


SHIPPED = "shipped:"  # an EAGLE-3 head shipped in homespec/assets/heads, named so that every machine finds its own copy


def eagle_folder(spec: str | Path) -> Path:
    """Where a head is: ``shipped:NAME`` in this installation's ``assets/heads``; a local folder or file as it is; a
    hub repo id ("owner/name" that is no local path) fetched into the Hugging Face cache, its config.json and one
    weights file (model.safetensors, else pytorch_model.bin)."""
    text = str(spec)
    if text.startswith(SHIPPED):
        from homespec.model.drafts import SHIPPED_HEADS

        name = text[len(SHIPPED) :]
        if not name or Path(name).name != name or not (SHIPPED_HEADS / name / "config.json").is_file():
            raise DraftError(f"no EAGLE head {name!r} is shipped with this HomeSpec", hint="update HomeSpec here")
        return SHIPPED_HEADS / name
    path = Path(spec).expanduser()
    if path.exists() or text.count("/") != 1 or text.startswith((".", "/", "~")):
        return path
    from homespec.model.fetch import HubFiles

    files = HubFiles(text)
    config = files.get("config.json")
    assert config is not None
    if files.get("model.safetensors", required=False) is None:
        files.get("pytorch_model.bin")
    return config.parent


def read_eagle(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A head folder (config.json + model.safetensors or pytorch_model.bin) or a weights file beside its
    config.json, or a hub repo id (``eagle_folder``): (its config, its tensors with the layer's prefix normalized
    to ``layer.``)."""
    path = eagle_folder(path)
    folder = path if path.is_dir() else path.parent
    files = [path] if path.is_file() else [folder / n for n in ("model.safetensors", "pytorch_model.bin")]
    weights = next((f for f in files if f.is_file()), None)
    if weights is None:
        raise DraftError(f"no EAGLE head at {path}", hint="give a folder with config.json and model.safetensors")
    config: dict[str, Any] = {}
    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise DraftError(f"{folder / 'config.json'} is unreadable: {exc}") from exc
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(weights))
        else:  # a .bin file: tensors only, never arbitrary objects
            raw = torch.load(str(weights), map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, zip and unpickling errors come in several types
        raise DraftError(f"EAGLE head {weights} is unreadable: {type(exc).__name__}: {exc}") from exc
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise DraftError(f"EAGLE head {weights} does not hold a flat table of tensors")
    out = {}
    for name, t in raw.items():
        key = name.removeprefix("model.")
        for prefix in _LAYER_PREFIXES:
            if key.startswith(prefix):
                key = "layer." + key[len(prefix) :]
        out[key] = t
    return config, out


def _layer_config(config: dict[str, Any]) -> dict[str, Any]:
    """The decoder layer's settings: the config itself, or speculators' ``transformer_layer_config``."""
    inner = config.get("transformer_layer_config")
    return {**config, **inner} if isinstance(inner, dict) else config


def default_taps(layers: int) -> tuple[int, ...]:
    """EAGLE-3's feature layers for a target of ``layers`` layers when its config names none (SafeAILab's choice)."""
    return (2, layers // 2, layers - 3)


def _taps(config: dict[str, Any], layers: int) -> tuple[int, ...]:
    named = config.get("eagle_aux_hidden_state_layer_ids") or (config.get("eagle_config") or {}).get(
        "eagle_aux_hidden_state_layer_ids"
    )
    taps = tuple(int(i) for i in named) if named else default_taps(layers)
    if len(taps) != 3 or not all(0 <= i < layers for i in taps):
        raise DraftError(f"EAGLE-3 feature layers {taps} do not fit a target of {layers} layers")
    return taps


def eagle_config(config: dict[str, Any], tensors: dict[str, torch.Tensor], target: Any) -> EagleConfig:
    """The head's shape, from its config where it says and its tensors, checked against the target's."""
    fc = tensors.get("fc.weight")
    h = int(target.hidden_size)
    if fc is None or fc.dim() != 2:
        raise DraftError("an EAGLE head needs fc.weight [hidden, 2 or 3 x hidden]")
    if fc.shape[0] != h or fc.shape[1] not in (2 * h, 3 * h):
        raise DraftError(
            f"EAGLE fc.weight is {list(fc.shape)}; the target's hidden size {h} needs [{h}, {2 * h}] "
            f"(EAGLE-1/2) or [{h}, {3 * h}] (EAGLE-3)"
        )
    version = 1 if fc.shape[1] == 2 * h else 3
    layer = _layer_config(config)
    heads = int(layer.get("num_attention_heads") or target.num_attention_heads)
    kv = int(layer.get("num_key_value_heads") or getattr(target, "num_key_value_heads", None) or heads)
    d = int(layer.get("head_dim") or getattr(target, "head_dim", None) or h // heads)
    gate = tensors.get("layer.mlp.gate_proj.weight")
    if gate is None:
        raise DraftError("an EAGLE head needs its layer's mlp.gate_proj.weight (layers.0.* or midlayer.*)")
    lm = tensors.get("lm_head.weight")
    vocab = int(lm.shape[0]) if version == 3 and lm is not None else 0
    if version == 3 and lm is None and int(config.get("draft_vocab_size") or 0):  # only a head that says so drafts
        raise DraftError("EAGLE-3 head has no tensor lm_head.weight")  # through the target's LM head
    taps = _taps(config, int(target.num_hidden_layers)) if version == 3 else ()
    eps = float(layer.get("rms_norm_eps") or getattr(target, "rms_norm_eps", None) or 1e-6)
    for option in ("norm_before_fc", "fc_norm", "norm_output"):
        if config.get(option):
            raise DraftError(f"EAGLE-3 head option {option} is not one HomeSpec runs", hint="SafeAILab and "
                             "speculators heads without it run (norm_before_residual is supported)")  # fmt: skip
    before = bool(config.get("norm_before_residual", False))
    extra = _further_layers(tensors)
    layers = 1 + len(extra)
    if extra != set(range(1, layers)):
        raise DraftError(
            f"EAGLE head layers {sorted(extra)} beside its first: expected layers.1 .. layers.{layers - 1}"
        )
    return EagleConfig(version, h, heads, kv, d, int(gate.shape[0]), eps, vocab, taps, before, layers)


class EagleCalls:
    """What a loaded EAGLE head (``EagleHead``) and one in training (``Eagle3Trainable``) compute, over their weights
    ``w`` (``eagle_shapes``' names)."""

    cfg: EagleConfig
    w: Mapping[str, torch.Tensor]

    def fc(self, streams: torch.Tensor) -> torch.Tensor:
        """EAGLE-3: the target's feature [n, H] from its three streams concatenated [n, 3H] (in one place)."""
        return F.linear(streams, self.w["fc.weight"])

    def forward(
        self,
        emb: torch.Tensor,  # [n, hidden]: embeddings of the rows' tokens
        feat: torch.Tensor,  # [n, hidden]: the feature before each row's token
        cos: torch.Tensor,  # [n, d]
        sin: torch.Tensor,  # [n, d]
        mask: torch.Tensor,  # [n, past + n] bool
        past: tuple[torch.Tensor, torch.Tensor] | None = None,  # ([kvh, past, d], [kvh, past, d])
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Predicted features [n, hidden], and this call's keys and values [kvh, n, d] (for a cache)."""
        return eagle_forward(self.cfg, self.w, emb, feat, cos, sin, mask, past)

    def normed(self, feat: torch.Tensor) -> torch.Tensor:
        """EAGLE-3: predicted features through the head's own ``norm``, as its LM head reads them."""
        return rms_norm(feat, self.w["norm.weight"], self.cfg.eps)


class EagleHead(EagleCalls, CachedRows):
    """One EAGLE head's weights and forward (inference only; the same call shape as ``head.DraftHead``)."""

    def __init__(self, cfg: EagleConfig, tensors: dict[str, torch.Tensor], vocab_size: int) -> None:
        # ``vocab``: HeadDraft's draft vocabulary (sorted token ids) for a head without an LM head of its own that
        # names one (``train-draft --eagle3 --draft-vocab K``: HomeSpec's ``draft_vocab`` tensor), drafting through
        # the target's LM-head rows for them; a head with its own LM head maps its rows with ``columns``
        self.cfg, self.vocab, self.layers = cfg, None, cfg.layers
        if cfg.version == 3 and not cfg.draft_vocab and VOCAB_KEY in tensors:
            self.vocab = _vocab_ids(tensors[VOCAB_KEY], vocab_size)
        want = eagle_shapes(cfg)
        if cfg.version == 1 and "fc.bias" in tensors:
            want["fc.bias"] = (cfg.hidden,)
        for name, shape in want.items():
            t = tensors.get(name)
            if t is None:
                raise DraftError(f"EAGLE-{cfg.version} head has no tensor {name}")
            if tuple(t.shape) != shape:
                raise DraftError(f"EAGLE-{cfg.version} head: {name} is {list(t.shape)}, expected {list(shape)}")
        self.w = {k: tensors[k].to(torch.float32) for k in want}
        self.columns: torch.Tensor | None = None  # EAGLE-3: the target token of each draft-vocabulary id
        if cfg.version == 3 and cfg.draft_vocab:
            self.columns = _draft_columns(tensors.get("d2t"), cfg.draft_vocab, vocab_size)

    def to(self, device: str, dtype: torch.dtype) -> EagleHead:
        self.w = {k: v.to(device=device, dtype=dtype) for k, v in self.w.items()}
        if self.columns is not None:
            self.columns = self.columns.to(device)
        return self

    def use_glue(self) -> bool:
        """EAGLE-3 through the native glue (as ``head.DraftHead.use_glue``: int8 products, one scale per output row):
        its q/k/v read [norm(emb), norm(feat)], so the feature half runs as a glued layer's q/k/v over the stream
        (the glue's first norm being ``hidden_norm``) and the embedding half's product is added to it
        (``glue_layers(qkv_add=...)``); the residual is the feature, as the glue's stream. Further layers are plain
        glued layers after it (the cache holds one layer per head layer). An EAGLE-1 head, a speculators head with
        ``norm_before_residual`` and one off the CPU keep torch's operators. Returns whether the glue runs the
        head."""
        if self.glued is not None:
            return True
        cfg, w = self.cfg, self.w
        if cfg.version != 3 or cfg.norm_before_residual or w["fc.weight"].device.type != "cpu":
            return False
        from homespec.model.quant import glue_int8
        from homespec.model.stage import GlueShape, _Layer, glue_io
        from homespec.native import library

        h = cfg.hidden

        def glued(pre: str, ln1: torch.Tensor, qkv: torch.Tensor) -> _Layer:
            return _Layer(
                ln1=ln1.float().contiguous(),
                ln2=w[f"{pre}post_attention_layernorm.weight"].float().contiguous(),
                wq=None, wk=None, wv=None,
                wo=glue_int8(w[f"{pre}self_attn.o_proj.weight"]),
                wd=glue_int8(w[f"{pre}mlp.down_proj.weight"]),
                qkv=glue_int8(qkv),
                gu=glue_int8(w[f"{pre}mlp.gate_proj.weight"], w[f"{pre}mlp.up_proj.weight"]),
            )  # fmt: skip

        def qkv_of(pre: str) -> torch.Tensor:  # [(heads + 2 kvh) d, width]
            return torch.cat([w[f"{pre}{p}.weight"].float() for p in _PROJ[:3]])

        first = qkv_of("layer.")
        layers = [glued("layer.", w["layer.hidden_norm.weight"], first[:, h:])]
        layers += [
            glued(f"layers.{i}.", w[f"layers.{i}.input_layernorm.weight"], qkv_of(f"layers.{i}."))
            for i in range(1, cfg.layers)
        ]
        shape = GlueShape(cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.eps, None, cfg.intermediate)
        glue = library() if glue_io(shape, layers) == torch.bfloat16 else None
        if glue is None:
            return False
        self.glued = (glue, shape, layers, glue_int8(first[:, :h]), w["layer.input_layernorm.weight"].float())
        return True

    def glue_rows(
        self, emb: torch.Tensor, feat: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segment: Any
    ) -> torch.Tensor:
        from homespec.model.stage import glue_layers, glue_product

        assert self.glued is not None
        glue, shape, layers, emb_qkv, ln = self.glued
        e = rms_norm(emb.float(), ln, self.cfg.eps).to(torch.bfloat16).contiguous()
        extra = glue_product(glue, e, [emb_qkv])
        return glue_layers(glue, shape, layers, feat.float(), [segment], cos.float(), sin.float(), qkv_add=extra)

    def logits(self, feat: torch.Tensor) -> torch.Tensor:
        """EAGLE-3 with its own LM head: draft-vocabulary logits [n, draft_vocab] of predicted features [n, hidden]
        (a head without one drafts through the target's: ``drafts/eagle.py``)."""
        return F.linear(self.normed(feat), self.w["lm_head.weight"])


def eagle_shapes(cfg: EagleConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an EAGLE head of this shape holds (names with the layer as ``layer.``), and its shape; EAGLE-1's
    optional fc bias is not listed. An EAGLE-3 head with ``draft_vocab`` 0 has no ``lm_head`` (HomeSpec's own
    heads: ``train-draft --eagle3``): it drafts through the target's LM head, every token."""
    h, d, x = cfg.hidden, cfg.head_dim, (1 if cfg.version == 1 else 2) * cfg.hidden
    want: dict[str, tuple[int, ...]] = {
        "layer.self_attn.q_proj.weight": (cfg.heads * d, x),
        "layer.self_attn.k_proj.weight": (cfg.kv_heads * d, x),
        "layer.self_attn.v_proj.weight": (cfg.kv_heads * d, x),
        "layer.self_attn.o_proj.weight": (h, cfg.heads * d),
        "layer.mlp.gate_proj.weight": (cfg.intermediate, h),
        "layer.mlp.up_proj.weight": (cfg.intermediate, h),
        "layer.mlp.down_proj.weight": (h, cfg.intermediate),
        "layer.post_attention_layernorm.weight": (h,),
    }
    for i in range(1, cfg.layers):  # the further layers: plain Llama decoder layers over the H-wide stream
        want |= {
            f"layers.{i}.self_attn.q_proj.weight": (cfg.heads * d, h),
            f"layers.{i}.self_attn.k_proj.weight": (cfg.kv_heads * d, h),
            f"layers.{i}.self_attn.v_proj.weight": (cfg.kv_heads * d, h),
            f"layers.{i}.self_attn.o_proj.weight": (h, cfg.heads * d),
            f"layers.{i}.mlp.gate_proj.weight": (cfg.intermediate, h),
            f"layers.{i}.mlp.up_proj.weight": (cfg.intermediate, h),
            f"layers.{i}.mlp.down_proj.weight": (h, cfg.intermediate),
            f"layers.{i}.input_layernorm.weight": (h,),
            f"layers.{i}.post_attention_layernorm.weight": (h,),
        }
    if cfg.version == 1:
        return want | {"fc.weight": (h, 2 * h)}
    want |= {
        "fc.weight": (h, 3 * h),
        "layer.input_layernorm.weight": (h,),
        "layer.hidden_norm.weight": (h,),
        "norm.weight": (h,),
    }
    if cfg.draft_vocab:
        want["lm_head.weight"] = (cfg.draft_vocab, h)
    return want


def eagle_forward(
    cfg: EagleConfig,
    w: Mapping[str, torch.Tensor],
    emb: torch.Tensor,
    feat: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor,
    past: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An EAGLE head's layers over weights ``w`` (``eagle_shapes``' names): predicted features [n, hidden] and the
    rows' keys and values [layers * kvh, n, d] (the layers' heads stacked, as ``past`` holds them). The one forward
    of a loaded head (``EagleHead``) and of one in training (``Eagle3Trainable``). A head of more than one layer
    (HomeSpec's ``train-draft --head-layers``; EAGLE-1's ``num_hidden_layers``) runs each further layer as a plain
    Llama decoder layer over the first's output, with the same positions and mask."""
    if cfg.version == 1:
        x = F.linear(torch.cat([emb, feat], -1), w["fc.weight"], w.get("fc.bias"))
        z = x  # the head's first layer has no input norm
    else:
        normed = rms_norm(feat, w["layer.hidden_norm.weight"], cfg.eps)
        x = normed if cfg.norm_before_residual else feat
        z = torch.cat([rms_norm(emb, w["layer.input_layernorm.weight"], cfg.eps), normed], -1)
    pasts = [None] * cfg.layers if past is None else list(zip(*(p.chunk(cfg.layers) for p in past), strict=True))
    x, k, v = _decoder(cfg, w, "layer.", x, z, cos, sin, mask, pasts[0])
    keys, values = [k], [v]
    for i in range(1, cfg.layers):
        pre = f"layers.{i}."
        z = rms_norm(x, w[pre + "input_layernorm.weight"], cfg.eps)
        x, k, v = _decoder(cfg, w, pre, x, z, cos, sin, mask, pasts[i])
        keys.append(k)
        values.append(v)
    return x, torch.cat(keys), torch.cat(values)


def _decoder(
    cfg: EagleConfig,
    w: Mapping[str, torch.Tensor],
    pre: str,
    x: torch.Tensor,  # [n, hidden]: the residual stream
    z: torch.Tensor,  # [n, width]: what q/k/v read (normed)
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor,
    past: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One head layer after its input norm: attention over ``z`` added to ``x``, then the MLP's residual."""
    n = z.shape[0]
    q, k, v = (F.linear(z, w[f"{pre}{p}.weight"]).view(n, -1, cfg.head_dim).transpose(0, 1) for p in _PROJ[:3])
    attn, k, v = head_attention(q, k, v, cos, sin, mask, past)
    x = x + F.linear(attn, w[f"{pre}self_attn.o_proj.weight"])
    r = rms_norm(x, w[f"{pre}post_attention_layernorm.weight"], cfg.eps)
    up = F.silu(F.linear(r, w[f"{pre}mlp.gate_proj.weight"])) * F.linear(r, w[f"{pre}mlp.up_proj.weight"])
    return x + F.linear(up, w[f"{pre}mlp.down_proj.weight"]), k, v


def _vocab_ids(t: torch.Tensor, vocab_size: int) -> torch.Tensor:
    ids = t.to(torch.int64).flatten()
    if len(ids) == 0 or bool((ids < 0).any() or (ids >= vocab_size).any()) or not bool((ids[1:] > ids[:-1]).all()):
        raise DraftError(f"the head's {VOCAB_KEY} is not a sorted set of token ids below {vocab_size}")
    return ids


def _draft_columns(d2t: torch.Tensor | None, draft_vocab: int, vocab_size: int) -> torch.Tensor:
    """The target token of each draft id: i + d2t[i] (a head over the whole vocabulary may leave d2t out)."""
    ids = torch.arange(draft_vocab, dtype=torch.int64)
    if d2t is None:
        if draft_vocab != vocab_size:
            raise DraftError(f"EAGLE-3 head scores {draft_vocab} draft tokens but has no d2t map to the target's")
        return ids
    if d2t.dim() != 1 or len(d2t) != draft_vocab or d2t.is_floating_point():
        raise DraftError(f"EAGLE-3 d2t is {d2t.dtype} {list(d2t.shape)}, expected integers [{draft_vocab}]")
    columns = ids + d2t.to(torch.int64)
    if int(columns.min()) < 0 or int(columns.max()) >= vocab_size or len(torch.unique(columns)) != draft_vocab:
        raise DraftError(f"EAGLE-3 d2t maps draft ids outside the target's {vocab_size} tokens, or two onto one")
    return columns


def load_eagle(path: str | Path, target: Any, dtype: torch.dtype = torch.float32, device: str = "cpu") -> EagleHead:
    """A published EAGLE head, checked against the target's config (``target``: a transformers-style config)."""
    config, tensors = read_eagle(path)
    cfg = eagle_config(config, tensors, target)
    return EagleHead(cfg, tensors, int(target.vocab_size)).to(device, dtype)


def eagle_version(path: str | Path, target: Any) -> int:
    """1 or 3: which EAGLE a head file is (its fc's width against the target's hidden size), read cheaply."""
    from safetensors import safe_open

    path = eagle_folder(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if file.suffix == ".safetensors" and file.is_file():
        try:
            with safe_open(str(file), framework="pt") as f:
                names = [n for n in f.keys() if n.removeprefix("model.") == "fc.weight"]  # noqa: SIM118
                width = f.get_slice(names[0]).get_shape()[-1] if names else 0
        except (OSError, ValueError) as exc:
            raise DraftError(f"EAGLE head {file} is unreadable: {exc}") from exc
        h = int(target.hidden_size)
        if width in (2 * h, 3 * h):
            return 1 if width == 2 * h else 3
    config, tensors = read_eagle(path)  # anything else: read it all, and say what is wrong
    return eagle_config(config, tensors, target).version


def tap_weights(path: str | Path, target: Any, start: int, end: int) -> dict[int, torch.Tensor]:
    """An EAGLE-3 head's fc columns [H, H] for each of its feature layers in [start, end): a stage's share of fc."""
    config, tensors = read_eagle(path)
    cfg = eagle_config(config, tensors, target)
    if cfg.version != 3:
        raise DraftError(f"{path} is an EAGLE-{cfg.version} head: only EAGLE-3 heads read the target's inner layers")
    fc, h = tensors["fc.weight"].to(torch.float32), cfg.hidden
    return {layer: fc[:, i * h : (i + 1) * h].contiguous() for i, layer in enumerate(cfg.taps) if start <= layer < end}


def _param(name: str) -> str:
    return name.replace(".", "__")  # a ParameterDict key cannot hold a dot


class Eagle3Trainable(EagleCalls, nn.Module):
    """An EAGLE-3 head in training (``train-draft --eagle3``, ``train_head.new_eagle3``): the forward of a loaded
    head (``eagle_forward``) over parameters with the published layout's names, its fp32 weights trained under
    autocast. It drafts through the target's LM head (no ``lm_head`` of its own, every token), so ``save`` writes a
    head with ``draft_vocab_size`` 0, or one over a draft vocabulary cut from the target's LM head (``d2t``)."""

    def __init__(self, cfg: EagleConfig) -> None:
        super().__init__()
        if cfg.version != 3 or cfg.draft_vocab:
            raise ValueError("Eagle3Trainable trains an EAGLE-3 head through the target's LM head (draft_vocab 0)")
        self.cfg = cfg
        self.weights = nn.ParameterDict({_param(k): nn.Parameter(torch.zeros(s)) for k, s in eagle_shapes(cfg).items()})

    @property
    def w(self) -> dict[str, torch.Tensor]:  # type: ignore[override]  # (EagleHead's is a plain attribute)
        return {k.replace("__", "."): p for k, p in self.weights.items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Go on from a head's weights (``read_eagle``'s names), e.g. one ``save`` wrote. A head of fewer layers gives
        its own; this one's further layers stay as they were started (``train_head.new_eagle3``: adding nothing)."""
        have = 1 + len(_further_layers(tensors))
        if have > self.cfg.layers:
            raise DraftError(f"the EAGLE-3 head to go on from has {have} layers; this one {self.cfg.layers}")
        with torch.no_grad():
            for name, p in self.w.items():
                if (m := _FURTHER.match(name)) and int(m[1]) >= have:
                    continue
                t = tensors.get(name)
                if t is None or tuple(t.shape) != tuple(p.shape):
                    raise DraftError(f"the EAGLE-3 head to go on from has no tensor {name} of shape {list(p.shape)}")
                p.copy_(t.to(torch.float32))

    def save(
        self,
        folder: Path,
        target: Any,
        extra: dict[str, Any] | None = None,
        vocab: torch.Tensor | None = None,
        lm_head: torch.Tensor | None = None,
    ) -> Path:
        """``folder``/config.json and model.safetensors in SafeAILab's EAGLE-3 layout (``midlayer.*``; fp16), for
        ``--draft eagle:FOLDER``. With ``vocab`` (sorted token ids) and ``lm_head`` (the target's LM head [V, H]), the
        file scores only those tokens: ``lm_head`` holds their rows and ``d2t`` maps draft id i to token i + d2t[i].
        With ``vocab`` alone, HomeSpec's own form: no LM head, the ids as a ``draft_vocab`` tensor; HomeSpec then
        drafts through the target's LM-head rows for them and the prompt's own tokens (a copy of those rows is
        19 MB here), and over every token where drafting is free (the pipelined modes), as ``--draft head`` does."""
        from safetensors.torch import save_file

        cfg = self.cfg
        tensors = {
            ("midlayer." + k[len("layer.") :] if k.startswith("layer.") else k): p.detach().to(torch.float16)
            for k, p in self.w.items()
        }
        draft_vocab = 0
        if vocab is not None and lm_head is None:
            tensors[VOCAB_KEY] = vocab.to(torch.int64).cpu().contiguous()
        elif vocab is not None:
            assert lm_head is not None
            ids = vocab.to(torch.int64).cpu()
            tensors["lm_head.weight"] = lm_head.detach().float().cpu()[ids].to(torch.float16)
            tensors["d2t"] = ids - torch.arange(len(ids))
            draft_vocab = len(ids)
        config = {
            "architectures": ["LlamaForCausalLMEagle3"],
            "model_type": "llama",
            "hidden_size": cfg.hidden,
            "num_attention_heads": cfg.heads,
            "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.head_dim,
            "intermediate_size": cfg.intermediate,
            "num_hidden_layers": cfg.layers,
            "rms_norm_eps": cfg.eps,
            "vocab_size": int(target.vocab_size),
            "draft_vocab_size": draft_vocab,
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(cfg.taps)},
            "homespec_target": target_fingerprint(target),  # which target it was trained for (shipped heads)
            "homespec_training": extra or {},
        }
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "model.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        return folder
