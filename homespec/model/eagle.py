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

fc is linear without a bias: fc([s_a, s_b, s_c]) = W_a s_a + W_b s_b + W_c s_c. In a pipeline the three layers sit
on different stages, so each stage holding one adds its W_i s_i into a running H-wide sum that travels with the
activations (``tap_weights``, ``Stage(taps=...)``), and the last stage returns the sum as the request's features.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from homespec.errors import DraftError
from homespec.model.head import CachedRows, head_attention
from homespec.model.stage import rms_norm

_LAYER_PREFIXES = ("layers.0.", "midlayer.")
_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


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


def eagle_folder(spec: str | Path) -> Path:
    """Where a head is: a local folder or file as it is; a hub repo id ("owner/name" that is no local path) fetched
    into the Hugging Face cache, its config.json and one weights file (model.safetensors, else pytorch_model.bin)."""
    path = Path(spec).expanduser()
    text = str(spec)
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


def _taps(config: dict[str, Any], layers: int) -> tuple[int, ...]:
    named = config.get("eagle_aux_hidden_state_layer_ids") or (config.get("eagle_config") or {}).get(
        "eagle_aux_hidden_state_layer_ids"
    )
    taps = tuple(int(i) for i in named) if named else (2, layers // 2, layers - 3)
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
    taps = _taps(config, int(target.num_hidden_layers)) if version == 3 else ()
    eps = float(layer.get("rms_norm_eps") or getattr(target, "rms_norm_eps", None) or 1e-6)
    for option in ("norm_before_fc", "fc_norm", "norm_output"):
        if config.get(option):
            raise DraftError(f"EAGLE-3 head option {option} is not one HomeSpec runs", hint="SafeAILab and "
                             "speculators heads without it run (norm_before_residual is supported)")  # fmt: skip
    before = bool(config.get("norm_before_residual", False))
    return EagleConfig(version, h, heads, kv, d, int(gate.shape[0]), eps, vocab, taps, before)


class EagleHead(CachedRows):
    """One EAGLE head's weights and forward (inference only; the same call shape as ``head.DraftHead``)."""

    def __init__(self, cfg: EagleConfig, tensors: dict[str, torch.Tensor], vocab_size: int) -> None:
        self.cfg, self.vocab = cfg, None  # ``vocab``: HeadDraft's draft vocabulary slot (unused: see ``columns``)
        h, d, x = cfg.hidden, cfg.head_dim, (1 if cfg.version == 1 else 2) * cfg.hidden
        want = {
            "layer.self_attn.q_proj.weight": (cfg.heads * d, x),
            "layer.self_attn.k_proj.weight": (cfg.kv_heads * d, x),
            "layer.self_attn.v_proj.weight": (cfg.kv_heads * d, x),
            "layer.self_attn.o_proj.weight": (h, cfg.heads * d),
            "layer.mlp.gate_proj.weight": (cfg.intermediate, h),
            "layer.mlp.up_proj.weight": (cfg.intermediate, h),
            "layer.mlp.down_proj.weight": (h, cfg.intermediate),
            "layer.post_attention_layernorm.weight": (h,),
        }
        if cfg.version == 1:
            want["fc.weight"] = (h, 2 * h)
            if "fc.bias" in tensors:
                want["fc.bias"] = (h,)
        else:
            want |= {
                "fc.weight": (h, 3 * h),
                "layer.input_layernorm.weight": (h,),
                "layer.hidden_norm.weight": (h,),
                "norm.weight": (h,),
                "lm_head.weight": (cfg.draft_vocab, h),
            }
        for name, shape in want.items():
            t = tensors.get(name)
            if t is None:
                raise DraftError(f"EAGLE-{cfg.version} head has no tensor {name}")
            if tuple(t.shape) != shape:
                raise DraftError(f"EAGLE-{cfg.version} head: {name} is {list(t.shape)}, expected {list(shape)}")
        self.w = {k: tensors[k].to(torch.float32) for k in want}
        self.columns: torch.Tensor | None = None  # EAGLE-3: the target token of each draft-vocabulary id
        if cfg.version == 3:
            self.columns = _draft_columns(tensors.get("d2t"), cfg.draft_vocab, vocab_size)

    def to(self, device: str, dtype: torch.dtype) -> EagleHead:
        self.w = {k: v.to(device=device, dtype=dtype) for k, v in self.w.items()}
        if self.columns is not None:
            self.columns = self.columns.to(device)
        return self

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
        cfg, w, n = self.cfg, self.w, emb.shape[0]
        if cfg.version == 1:
            x = F.linear(torch.cat([emb, feat], -1), w["fc.weight"], w.get("fc.bias"))
            z = x  # the head's first layer has no input norm
        else:
            normed = rms_norm(feat, w["layer.hidden_norm.weight"], cfg.eps)
            x = normed if cfg.norm_before_residual else feat
            z = torch.cat([rms_norm(emb, w["layer.input_layernorm.weight"], cfg.eps), normed], -1)
        q, k, v = (F.linear(z, w[f"layer.{p}.weight"]).view(n, -1, cfg.head_dim).transpose(0, 1) for p in _PROJ[:3])
        attn, k, v = head_attention(q, k, v, cos, sin, mask, past)
        x = x + F.linear(attn, w["layer.self_attn.o_proj.weight"])
        r = rms_norm(x, w["layer.post_attention_layernorm.weight"], cfg.eps)
        up = F.silu(F.linear(r, w["layer.mlp.gate_proj.weight"])) * F.linear(r, w["layer.mlp.up_proj.weight"])
        return x + F.linear(up, w["layer.mlp.down_proj.weight"]), k, v

    def logits(self, feat: torch.Tensor) -> torch.Tensor:
        """EAGLE-3: draft-vocabulary logits [n, draft_vocab] of predicted features [n, hidden]."""
        return F.linear(rms_norm(feat, self.w["norm.weight"], self.cfg.eps), self.w["lm_head.weight"])


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
