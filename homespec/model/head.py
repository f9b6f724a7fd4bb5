"""An EAGLE-style draft head (DESIGN §5 ``head``): one Llama decoder layer that predicts the target's next
last-layer hidden state ("feature") from the current one and the embedding of the token that follows it.

Row alignment, the same in training and drafting: the row for the token at position ``q`` takes
``fc([embed(x_q), f_{q-1}])`` at rotary position ``q - 1`` and outputs ``f̂_q``, the feature the target would have
at ``q``; the target's own frozen final norm and LM head turn ``f̂_q`` into log-probs for the token at ``q + 1``.
``f_{q-1}`` is the target's true feature when the target has computed position ``q - 1`` (the committed text), or
the head's own prediction for deeper draft levels.

The head owns only ``fc`` and its layer (a few MB); embeddings, norm and LM head stay the target's. Files are
safetensors with the config (and the target's fingerprint) in the metadata, so a head never runs on another model.

A head file may also hold a **draft vocabulary** (``draft_vocab``: token ids, the tokens its target wrote most in
the training data): the head then scores only those tokens (and the request's own prompt tokens). The LM head is
most of a head's compute (49k x 576 against one layer of 576 for SmolLM2), so a third of the vocabulary drafts
about 4x faster while covering almost every token the target writes (FR-Spec's frequency-ranked vocabulary).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from homespec.errors import DraftError
from homespec.model.kv import TreeKVCache
from homespec.model.quant import glue_int8
from homespec.model.stage import (
    GlueShape,
    Segment,
    _Layer,
    glue_io,
    glue_layers,
    glue_product,
    rms_norm,
    rotate_half,
)

FORMAT = "homespec-draft-head-1"
VOCAB_KEY = "draft_vocab"


@dataclass(frozen=True)
class HeadConfig:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    target: str  # fingerprint of the target's architecture (target_fingerprint)

    @classmethod
    def for_target(cls, config: Any) -> HeadConfig:
        hidden = int(config.hidden_size)
        heads = int(config.num_attention_heads)
        return cls(
            hidden=hidden,
            heads=heads,
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or hidden // heads),
            intermediate=int(config.intermediate_size),
            eps=float(config.rms_norm_eps),
            target=target_fingerprint(config),
        )


def target_fingerprint(config: Any) -> str:
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    text = json.dumps({k: getattr(config, k, None) for k in keys}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def head_attention(
    q: torch.Tensor,  # [heads, n, d]
    k: torch.Tensor,  # [kvh, n, d]
    v: torch.Tensor,  # [kvh, n, d]
    cos: torch.Tensor,  # [n, d]
    sin: torch.Tensor,  # [n, d]
    mask: torch.Tensor,  # [n, past + n] bool
    past: tuple[torch.Tensor, torch.Tensor] | None,  # ([kvh, past, d], [kvh, past, d])
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A head layer's attention: rotary on q and k, the rows attending over ``past`` and themselves as ``mask``
    says. Returns the heads' outputs [n, heads * d] and the rows' rotated keys and values [kvh, n, d]."""
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    keys, values = (k, v) if past is None else (torch.cat([past[0], k], 1), torch.cat([past[1], v], 1))
    attn = F.scaled_dot_product_attention(
        q[None], keys[None], values[None], attn_mask=mask[None, None], enable_gqa=True
    )  # [1, heads, n, d]
    return attn[0].transpose(0, 1).reshape(q.shape[1], -1), k, v


class CachedRows:
    """What a draft head (``DraftHead``, ``eagle.EagleHead``) does with its own KV cache: rows written at given
    slots, and a cache of its shape (one layer per head layer). The head supplies ``cfg`` (kv_heads, head_dim),
    ``layers`` and ``forward``, whose keys and values stack its layers' heads ([layers * kvh, n, d])."""

    cfg: Any
    layers: int = 1
    glued: tuple[Any, ...] | None = None  # the native glue and the layer's weights for it (``DraftHead.use_glue``)

    def use_glue(self) -> bool:
        """Draft through the native glue where this head's layer fits it; returns whether it does (here: never,
        a published EAGLE head keeps torch's operators)."""
        return False

    def forward(
        self,
        emb: torch.Tensor,
        feat: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @torch.inference_mode()
    def run_cached(
        self,
        cache: TreeKVCache,
        emb: torch.Tensor,  # [n, hidden]
        feat: torch.Tensor,  # [n, hidden]
        cos: torch.Tensor,
        sin: torch.Tensor,
        start: int,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Rows written at cache slots [start, start + n), attending as ``mask`` says; returns predicted features."""
        n = emb.shape[0]
        if self.glued is not None and cache.k.dtype == torch.float32 and cache.k.device.type == "cpu":
            return self.glue_rows(emb, feat, cos, sin, Segment(cache, start, n, mask))
        past = (cache.k[:, :, :start].flatten(0, 1), cache.v[:, :, :start].flatten(0, 1))  # (views)
        out, k, v = self.forward(emb, feat, cos, sin, mask, past)
        cache.k[:, :, start : start + n] = k.unflatten(0, (self.layers, -1))
        cache.v[:, :, start : start + n] = v.unflatten(0, (self.layers, -1))
        return out

    def glue_rows(
        self, emb: torch.Tensor, feat: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segment: Segment
    ) -> torch.Tensor:
        """``run_cached`` through the native glue (after ``use_glue`` said yes)."""
        raise NotImplementedError

    def new_cache(self, max_context: int, max_tree: int, dtype: torch.dtype, device: str) -> TreeKVCache:
        return TreeKVCache(self.layers, self.cfg.kv_heads, self.cfg.head_dim, max_context, max_tree, dtype, device)


class DraftHead(CachedRows, nn.Module):
    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        h, d = cfg.hidden, cfg.head_dim
        self.cfg = cfg
        self.vocab: torch.Tensor | None = None  # the draft vocabulary (sorted token ids), None: all tokens
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.ln1 = nn.Parameter(torch.ones(h))
        self.ln2 = nn.Parameter(torch.ones(h))
        self.q = nn.Linear(h, cfg.heads * d, bias=False)
        self.k = nn.Linear(h, cfg.kv_heads * d, bias=False)
        self.v = nn.Linear(h, cfg.kv_heads * d, bias=False)
        self.o = nn.Linear(cfg.heads * d, h, bias=False)
        self.gate = nn.Linear(h, cfg.intermediate, bias=False)
        self.up = nn.Linear(h, cfg.intermediate, bias=False)
        self.down = nn.Linear(cfg.intermediate, h, bias=False)
        self.glued: tuple[Any, ...] | None = None  # ``use_glue``: the native glue and this layer's int8 weights

    def use_glue(self) -> bool:
        """Draft through the native glue (``homespec.native``, as a quantized stage runs its layers): the layer's
        products in int8 with one scale per output row, ``fc`` in bf16, the rest in the glue's five calls. A head
        forward at one row costs ~40 small operator calls in fp32 otherwise, about half a target step on the
        bundled model (BENCHMARKS.md §6). Training keeps ``forward``. Returns whether the glue runs the head."""
        if self.glued is not None:
            return True
        if self.fc.weight.device.type != "cpu":
            return False
        from homespec.native import library

        cfg = self.cfg

        layer = _Layer(
            ln1=self.ln1.detach().float().contiguous(),
            ln2=self.ln2.detach().float().contiguous(),
            wq=None, wk=None, wv=None,
            wo=glue_int8(self.o.weight),
            wd=glue_int8(self.down.weight),
            qkv=glue_int8(self.q.weight, self.k.weight, self.v.weight),
            gu=glue_int8(self.gate.weight, self.up.weight),
        )  # fmt: skip
        shape = GlueShape(cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.eps, None, cfg.intermediate)
        glue = library() if glue_io(shape, [layer]) == torch.bfloat16 else None
        if glue is None:
            return False
        # fc stays bf16: its input holds the target's features, whose outlier channels (thousands, against
        # embeddings of about 1) make an int8 grid of fc's rows lose the rest (cosine 0.99 to fp32, 0.9999 in bf16)
        self.glued = (glue, shape, layer, self.fc.weight.detach().to(torch.bfloat16))
        return True

    def glue_rows(
        self, emb: torch.Tensor, feat: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segment: Segment
    ) -> torch.Tensor:
        assert self.glued is not None
        glue, shape, layer, fc = self.glued
        x = glue_product(glue, torch.cat([emb, feat], dim=-1).to(torch.bfloat16), [fc]).float()
        return glue_layers(glue, shape, [layer], x, [segment], cos.float(), sin.float())

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
        cfg, n = self.cfg, emb.shape[0]
        x = self.fc(torch.cat([emb, feat], dim=-1))
        r = rms_norm(x, self.ln1, cfg.eps)
        q = self.q(r).view(n, cfg.heads, cfg.head_dim).transpose(0, 1)
        k = self.k(r).view(n, cfg.kv_heads, cfg.head_dim).transpose(0, 1)
        v = self.v(r).view(n, cfg.kv_heads, cfg.head_dim).transpose(0, 1)
        attn, k, v = head_attention(q, k, v, cos, sin, mask, past)
        x = x + self.o(attn)
        r = rms_norm(x, self.ln2, cfg.eps)
        return x + self.down(F.silu(self.gate(r)) * self.up(r)), k, v

    # -- files ---------------------------------------------------------------------------------------------
    def save(self, path: Path, extra: dict[str, Any] | None = None, dtype: torch.dtype = torch.float16) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to(dtype).contiguous() for k, v in self.state_dict().items()}
        if self.vocab is not None:
            tensors[VOCAB_KEY] = self.vocab.to(torch.int64).contiguous()
        meta = {"format": FORMAT, "config": json.dumps(asdict(self.cfg)), "training": json.dumps(extra or {})}
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)


def head_fingerprint(path: Path) -> str | None:
    """The target fingerprint a head file was trained for (None if it is not a head file)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        target = json.loads(meta["config"])["target"] if meta.get("format") == FORMAT else None
        return str(target) if target is not None else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_head(path: Path, target_config: Any, dtype: torch.dtype = torch.float32, device: str = "cpu") -> DraftHead:
    """A saved head, checked against the target it is about to draft for."""
    from safetensors import safe_open

    if not path.is_file():
        raise DraftError(f"draft head not found: {path}", hint="train one with: homespec train-draft --out DIR")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise DraftError(f"{path} is not a HomeSpec draft head (format {meta.get('format')!r})")
            cfg = HeadConfig(**json.loads(meta["config"]))
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DraftError(f"draft head {path} is unreadable: {exc}") from exc
    want = target_fingerprint(target_config)
    if cfg.target != want:
        raise DraftError(
            f"draft head {path} was trained for another model (fingerprint {cfg.target}, target {want})",
            hint="train a head for this model: homespec train-draft MODEL --out DIR",
        )
    vocab = tensors.pop(VOCAB_KEY, None)
    size = int(target_config.vocab_size)
    if vocab is not None and (vocab.dim() != 1 or not len(vocab) or int(vocab.min()) < 0 or int(vocab.max()) >= size):
        raise DraftError(f"draft head {path} has a draft vocabulary outside the target's {size} tokens")
    head = DraftHead(cfg)
    head.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()})
    head.vocab = None if vocab is None else vocab.to(torch.int64)
    return head.to(device=device, dtype=dtype).eval()


def write_vocab(path: Path, target_config: Any, vocab: torch.Tensor | None) -> None:
    """Rewrite a head file with this draft vocabulary (None: score every token), its weights and training record
    unchanged (``train-draft --vocab-for``)."""
    from safetensors import safe_open

    head = load_head(path, target_config)
    with safe_open(str(path), framework="pt") as f:
        extra = json.loads((f.metadata() or {}).get("training", "{}"))
    head.vocab = vocab
    extra["draft_vocab"] = 0 if vocab is None else len(vocab)
    head.save(path, extra)
