"""Held-out top-1 by depth of draft heads, all on the same train-draft data (BENCHMARKS.md §3).

    .venv/bin/python benchmarks/head_eval.py DIR HEAD.safetensors [HEAD ...] [--depth 8] [--from-group 160]

DIR is a ``train-draft --out`` folder (its ``data/`` shards, or an older ``data.safetensors``). The held-out
sequences are the ones ``train-draft`` holds out of that data (same seed and share); ``--from-group N`` keeps only
prompts N and later (the built-in 160 come first: a head trained on them has seen their greedy replies). Depth j:
the head reads its own predicted features j - 1 deep, the target's tokens (``train_head.top1_by_depth``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=Path)
    ap.add_argument("heads", type=Path, nargs="+")
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--from-group", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="at most N held-out sequences (0: all)")
    ap.add_argument("--greedy", action="store_true", help="only each prompt's first reply (the greedy one)")
    ap.add_argument("--dtype", default="bf16")
    args = ap.parse_args()
    from homespec.cli.common import DEFAULT_DRAFT, keep_freed_memory
    from homespec.engine import Engine, EngineOptions
    from homespec.model.head import load_head
    from homespec.model.train_head import Sequences, TrainConfig, _whole_target, split, top1_by_depth

    keep_freed_memory()
    legacy = args.dir / "data.safetensors"
    data = Sequences.load(legacy) if legacy.is_file() else Sequences.load_shards(args.dir / "data")
    cfg = TrainConfig(dtype=args.dtype)
    _, held = split(data, cfg)
    held = [i for i in held if data.group_of(i) >= args.from_group]
    if args.greedy:  # a prompt's replies are stored together, the greedy one first
        held = [i for i in held if i == 0 or data.group_of(i - 1) != data.group_of(i)]
    if args.limit:
        held = held[: args.limit]
    rows = sum(len(data.tokens[i]) - 1 for i in held)
    print(f"{len(held)} held-out sequences, {rows} rows; top-1 at depths 1..{args.depth}")
    options = EngineOptions(model=None, draft=DEFAULT_DRAFT, dtype=args.dtype, weights=args.dtype)
    with Engine(options) as engine:
        stage = _whole_target(engine)
        for path in args.heads:
            head = load_head(path, engine.source.config, torch.float32)
            started = time.perf_counter()
            got = top1_by_depth(head, stage, data, held, cfg, args.depth)
            took = time.perf_counter() - started
            print(f"| {path} | " + " | ".join(f"{x:.3f}" for x in got) + f" | ({took:.0f} s)")


if __name__ == "__main__":
    main()
