"""Perplexity of a float checkpoint quantized at load, per int4 group size and in int8 (BENCHMARKS.md §6).

``--weights int4`` quantizes a float checkpoint in groups of ``formats.INT4_GROUP``; this script measures what other
groups would cost on the same text, with the same quantizer (``formats.quantize_at_load``: fitted grids per group,
the embeddings and LM head int8). Every linear of a float stage is replaced in place by its quantized weight, so all
rows share the fp32 run's tokens and windows.

    .venv/bin/python benchmarks/int4_groups.py gemma3-270m tests/data/heldout.txt --groups 32,64,128
    .venv/bin/python benchmarks/int4_groups.py gemma3-270m tests/data/heldout.txt --groups 32 --mixed wd --mixed wv,wd
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from homespec.model.formats import quantize_at_load
from homespec.model.loader import resolve
from homespec.model.perplexity import score, text_ids
from homespec.model.stage import _LAYER_TENSORS, Stage


def quantized_copy(fp32: Stage, source_model: str | None, fmt: str, group: int, int8: tuple[str, ...] = ()) -> Stage:
    """A fresh fp32 stage of the whole model whose linears (and ends) are ``fmt`` in groups of ``group``; the
    linears named in ``int8`` (``_LAYER_TENSORS`` keys: wq, wk, wv, wo, wg, wu, wd) int8 instead."""
    stage = Stage(resolve(source_model), 0, fp32.end, weights="fp32", native=False)  # weights swapped below
    for i, layer in enumerate(stage.layers):
        for attr, name in _LAYER_TENSORS.items():
            w = getattr(layer, attr)
            if attr.startswith("w") and isinstance(w, torch.Tensor):
                kind = "int8" if attr in int8 else fmt
                setattr(layer, attr, quantize_at_load(f"model.layers.{i}.{name}", w.float(), kind, group=group))
    tied = stage.head_w is stage.embed_w
    assert isinstance(stage.embed_w, torch.Tensor)
    stage.embed_w = quantize_at_load("model.embed_tokens.weight", stage.embed_w.float(), fmt, group=group)
    if tied:
        stage.head_w = stage.embed_w
    elif isinstance(stage.head_w, torch.Tensor):
        stage.head_w = quantize_at_load("lm_head.weight", stage.head_w.float(), fmt, group=group)
    stage.invariant = True
    return stage


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", help="a float checkpoint (folder, repo or named model; a GGUF is dequantized)")
    parser.add_argument("texts", nargs="+", type=Path)
    parser.add_argument("--groups", default="32,64,128")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument(
        "--mixed", action="append", default=[], help="also int4 g32 with these linears int8, e.g. wv,wd (repeatable)"
    )
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    source = resolve(args.model)
    fp32 = Stage(source, 0, source.num_layers, weights="fp32")
    tok = source.tokenizer()
    ids = {p.name: text_ids(tok, p.read_text()) for p in args.texts}
    runs: list[tuple[str, Stage]] = [("fp32", fp32), ("int8", quantized_copy(fp32, args.model, "int8", 32))]
    runs += [(f"int4 g{g}", quantized_copy(fp32, args.model, "int4", g)) for g in map(int, args.groups.split(","))]
    for keep in args.mixed:
        runs.append((f"int4 g32, {keep} int8", quantized_copy(fp32, args.model, "int4", 32, tuple(keep.split(",")))))
    base: dict[str, float] = {}
    print("| weights | " + " | ".join(f"{n} ({len(t)} tokens)" for n, (t, _) in ids.items()) + " |")
    print("| --- |" + " ---: |" * len(ids))
    rows = []
    for label, stage in runs:
        cells = []
        for name, (t, bos) in ids.items():
            ppl = score([stage], t, args.window, bos=bos).perplexity
            base.setdefault(name, ppl)
            cells.append(f"{ppl:.3f} ({100 * (ppl / base[name] - 1):+.1f}%)")
            rows.append({"weights": label, "text": name, "perplexity": ppl})
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
