"""Training a draft head (``homespec train-draft``) from the target's own greedy outputs (DESIGN §5 ``head``).

1. **Data**: for each training prompt, the target's greedy reply (``max_new`` tokens, chat template on), then one
   forward over prompt + reply for its last-layer features ``f`` and greedy next tokens. Written once to
   ``DIR/data.safetensors``; a later run reuses it.
2. **Training**: the head sees ``(embed(x_q), f_{q-1})`` for every position q of a sequence (causal attention)
   and learns to predict ``f_q`` (smooth L1) and the target's greedy next token through the frozen norm and LM head
   (cross-entropy), EAGLE's objective. The decoder layer starts from the target's last layer, ``fc`` from "take the
   feature". One sequence per step, AdamW, cosine decay. ``DIR/checkpoint.pt`` after every epoch makes a run
   resumable; ``DIR/head.safetensors`` is the result. Reported per epoch: training loss and, on held-out
   sequences, how often the head's top-1 next token is the target's (one step ahead, true features).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from homespec.model.head import DraftHead, HeadConfig
from homespec.model.stage import Stage


@dataclass(frozen=True)
class TrainConfig:
    max_new: int = 96
    epochs: int = 12
    lr: float = 5e-4
    cls_weight: float = 0.2  # EAGLE uses 0.1; a small target's features are noisier, the token matters more
    noise: float = 0.05  # uniform noise on input features (EAGLE), for robustness to its own predictions
    holdout: float = 0.1
    seed: int = 0


@dataclass
class Sequences:
    tokens: list[torch.Tensor]  # int64 [T]
    features: list[torch.Tensor]  # float16 [T, hidden]
    labels: list[torch.Tensor]  # int64 [T]: the target's greedy next token after each position

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        for i, (t, f, y) in enumerate(zip(self.tokens, self.features, self.labels, strict=True)):
            tensors[f"{i}.tokens"], tensors[f"{i}.features"], tensors[f"{i}.labels"] = t, f.contiguous(), y
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"count": str(len(self.tokens))})

    @classmethod
    def load(cls, path: Path) -> Sequences:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            n = int((f.metadata() or {})["count"])
            get = f.get_tensor
            return cls(
                [get(f"{i}.tokens") for i in range(n)],
                [get(f"{i}.features") for i in range(n)],
                [get(f"{i}.labels") for i in range(n)],
            )


def build_data(engine: Any, prompts: Sequence[str], max_new: int, progress: Callable[[], None]) -> Sequences:
    """The target's greedy replies to ``prompts`` and its features over prompt + reply."""
    from homespec.config import GenerationConfig
    from homespec.events import GenerationFinished

    stage: Stage = _whole_target(engine)
    out = Sequences([], [], [])
    for prompt in prompts:
        ids = engine.encode(prompt)
        done = list(engine.generate(ids, GenerationConfig(max_tokens=max_new)))[-1]
        assert isinstance(done, GenerationFinished)
        seq = torch.tensor([*ids, *done.tokens], dtype=torch.int64)
        cache = stage.new_cache(len(seq) + 1, 1)
        logits = stage.forward_prefix(cache, seq, range(len(seq)))
        assert stage.last_hidden is not None
        out.tokens.append(seq)
        out.features.append(stage.last_hidden.to(torch.float16))
        out.labels.append(torch.argmax(logits, dim=-1))
        progress()
    return out


def new_head(engine: Any) -> DraftHead:
    """A head for the engine's target: its decoder layer copied from the target's last layer."""
    stage = _whole_target(engine)
    head = DraftHead(HeadConfig.for_target(engine.source.config))
    last = stage.layers[-1]
    with torch.no_grad():
        for name, src in (("q", last.wq), ("k", last.wk), ("v", last.wv), ("o", last.wo)):
            getattr(head, name).weight.copy_(src)
        head.gate.weight.copy_(last.wg)
        head.up.weight.copy_(last.wu)
        head.down.weight.copy_(last.wd)
        head.ln1.copy_(last.ln1)
        head.ln2.copy_(last.ln2)
        h = head.cfg.hidden
        head.fc.weight.zero_()
        head.fc.weight[:, h:] = torch.eye(h)  # start as "the feature itself"
        head.fc.weight[:, :h].normal_(0.0, 0.02)
    return head


def train(
    engine: Any,
    data: Sequences,
    out_dir: Path,
    cfg: TrainConfig,
    report: Callable[[dict[str, float]], None],
    progress: Callable[[], None] | None = None,
    max_steps: int | None = None,
) -> DraftHead:
    """Train (or resume) a head on ``data``; writes DIR/checkpoint.pt each epoch and DIR/head.safetensors."""
    stage = _whole_target(engine)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    order = list(range(len(data.tokens)))
    rng.shuffle(order)
    n_hold = max(1, int(len(order) * cfg.holdout)) if len(order) > 1 else 0
    held, train_ids = order[:n_hold], order[n_hold:] or order
    head = new_head(engine)
    opt = torch.optim.AdamW([p for p in head.parameters()], lr=cfg.lr, weight_decay=0.0)
    total = cfg.epochs * len(train_ids) if max_steps is None else max_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    ckpt = out_dir / "checkpoint.pt"
    first_epoch = 0
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        first_epoch = int(state["epoch"]) + 1
    steps = 0
    for epoch in range(first_epoch, cfg.epochs):
        head.train()
        rng_epoch = random.Random(cfg.seed * 1000 + epoch)
        ids = list(train_ids)
        rng_epoch.shuffle(ids)
        losses = []
        started = time.perf_counter()
        for i in ids:
            with torch.enable_grad():  # the engine turns autograd off process-wide
                loss, _ = _loss(head, stage, data, i, cfg)
                opt.zero_grad()
                loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss))
            steps += 1
            if progress:
                progress()
            if max_steps is not None and steps >= max_steps:
                break
        head.eval()
        with torch.no_grad():
            hits = [_loss(head, stage, data, i, cfg, noise=False)[1] for i in held]
        acc = sum(h for h, _ in hits) / max(1, sum(n for _, n in hits))
        report(
            {"epoch": epoch, "loss": sum(losses) / max(1, len(losses)), "top1": acc, "s": time.perf_counter() - started}
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"head": head.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "epoch": epoch}, ckpt
        )
        if max_steps is not None and steps >= max_steps:
            break
    return head


def _loss(
    head: DraftHead, stage: Stage, data: Sequences, i: int, cfg: TrainConfig, noise: bool = True
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Loss on sequence i, and (top-1 hits, rows)."""
    tokens, feats, labels = data.tokens[i], data.features[i].float(), data.labels[i]
    n = len(tokens) - 1  # rows q = 1 .. T-1
    emb = stage.embed(tokens[1:]).detach()
    inp = feats[:-1]
    if noise and cfg.noise:
        inp = inp + (torch.rand_like(inp) - 0.5) * 2 * cfg.noise
    cos, sin = stage.rope(range(n))  # row q at position q - 1
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    pred, _, _ = head(emb, inp, cos, sin, mask)
    target = feats[1:]
    reg = F.smooth_l1_loss(pred, target)
    logits = stage.logits(pred)
    y = labels[1:]
    cls = F.cross_entropy(logits.float(), y)
    hits = int((logits.argmax(-1) == y).sum())
    return reg + cfg.cls_weight * cls, (hits, n)


def _whole_target(engine: Any) -> Stage:
    stages = engine.decoder.stages
    if len(stages) != 1:
        raise ValueError("train-draft needs the whole target in one in-process stage")
    stage: Stage = stages[0]
    return stage


def load_prompts(path: Path) -> list[str]:
    return [json.loads(line)["turns"][0] for line in path.read_text().splitlines() if line.strip()]
