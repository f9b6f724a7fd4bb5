"""A decode step's matrix products on this CPU: torch's kernels against the native glue's own (BENCHMARKS.md §6).

    .venv/bin/python benchmarks/native_products.py [MODEL] [--threads 2] [--rounds 9] [--rows 1,2,4,8,16]

For every linear weight of the whole model (its layers and the LM head), in fp32, bf16 and int8 (per channel,
quantized here from the float copy): the time of one pass over all of them at each row count, median of
``--rounds``, through torch (``F.linear``; ``aten._weight_int8pack_mm`` for int8) and through ``glue_product``
(``hs_linear_f32``, ``hs_linear_bf16``, ``hs_linear_i8``). Random inputs; the weights are the model's own, so the
shapes and bytes are a real decode step's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from homespec import native
from homespec.model.loader import resolve
from homespec.model.quant import Int8Channel, bf16_product, quantize_int8
from homespec.model.stage import Stage, glue_product


def weights(stage: Stage) -> list[torch.Tensor]:
    out = []
    for layer in stage.layers:
        out += [layer.part(k, stage.part_rows) for k in ("wq", "wk", "wv", "wg", "wu")]
        out += [layer.wo, layer.wd]
    out.append(stage.head_w)
    return [w for w in out if isinstance(w, torch.Tensor)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--rows", default="1,2,4,8,16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    glue = native.library()
    assert glue is not None, "the native glue did not build"
    source = resolve(args.model)
    dense = weights(Stage(source, 0, source.num_layers, weights="fp32", native=False))
    kinds: dict[str, tuple[list[Any], torch.dtype]] = {
        "fp32": (dense, torch.float32),
        "bf16": ([w.bfloat16() for w in dense], torch.bfloat16),
        "int8": ([quantize_int8(w, torch.bfloat16) for w in dense], torch.bfloat16),
    }
    print(f"{source.name}: {len(dense)} weights, {sum(w.numel() for w in dense) / 1e6:.1f}M parameters, "
          f"{args.threads} threads; ms per pass over all of them (median of {args.rounds})")  # fmt: skip
    print("| weights | rows | torch | glue | torch / glue |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for kind, (ws, dtype) in kinds.items():
        for n in (int(r) for r in args.rows.split(",")):
            xs = {w_in: torch.randn(n, w_in).to(dtype) for w_in in {_in(w) for w in ws}}
            pairs = [(xs[_in(w)], w) for w in ws]
            a, b = _median(lambda p=pairs: _torch(p), args.rounds), _median(lambda p=pairs: _glue(glue, p), args.rounds)
            print(f"| {kind} | {n} | {a:.2f} | {b:.2f} | {a / b:.2f}× |")


def _torch(pairs: list[tuple[torch.Tensor, Any]]) -> None:
    for x, w in pairs:
        if isinstance(w, Int8Channel):
            bf16_product(x, w)
        else:
            F.linear(x, w)


def _glue(glue: Any, pairs: list[tuple[torch.Tensor, Any]]) -> None:
    for x, w in pairs:
        glue_product(glue, x, [w])


def _in(w: Any) -> int:
    return int(w.in_features if isinstance(w, Int8Channel) else w.shape[1])


def _median(fn: Any, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


if __name__ == "__main__":
    main()
