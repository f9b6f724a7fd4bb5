"""Where an int4 decode step's time goes on this CPU, against llama.cpp's 5.6 ms per token (BENCHMARKS.md §6).

    .venv/bin/python benchmarks/stage_floor.py [MODEL] [--threads 1] [--rounds 9]

For the whole model as one int4 stage (``--weights int4``), one row after a 200-token prefix:

- the step itself (``Stage.forward_prefix``, embeddings to logits), median per token;
- its matrix products alone: the same int4 kernel calls on the same weights (and the LM head), at 1 / 4 / 16 rows;
- the operator profile of the step: calls per token and the five largest shares of its time.

The products alone bound what any rewrite of the rest can reach with torch's own int4 kernel.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from homespec.model.loader import resolve
from homespec.model.quant import Int4Affine, linear
from homespec.model.stage import Stage


def median_ms(fn: Callable[[], object], rounds: int, inner: int = 10) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    source = resolve(args.model)
    stage = Stage(source, 0, source.num_layers, weights="int4")
    weights = [w for layer in stage.layers for w in layer.weights() if isinstance(w, Int4Affine)]
    cache = stage.new_cache(max_context=4096, max_tree=4)
    stage.forward_prefix(cache, torch.randint(0, 1000, (200,), generator=torch.Generator().manual_seed(0)), range(200))
    pos = [200]

    def step() -> None:
        stage.forward_prefix(cache, torch.tensor([5]), range(pos[0], pos[0] + 1))
        pos[0] += 1

    print(f"{source.name}, {len(stage.layers)} layers, int4, {args.threads} thread(s), torch {torch.__version__}")
    step_ms = median_ms(step, args.rounds)
    print(f"one decode step: {step_ms:.2f} ms per token")
    head = stage.head_w
    assert head is not None
    for n in (1, 4, 16):
        xs = {w.in_features: torch.randn(n, w.in_features) for w in weights}
        h = torch.randn(n, stage.hidden)

        def products(xs: dict[int, torch.Tensor] = xs, h: torch.Tensor = h) -> None:
            for w in weights:
                linear(xs[w.in_features], w)
            linear(h, head)

        ms = median_ms(products, args.rounds)
        print(f"  its {len(weights)} int4 products and the LM head alone, {n:2d} rows: {ms:.2f} ms")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            step()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    calls = sum(e.count for e in events) / 20
    print(f"operators per token: {calls:.0f} aten calls (views included)")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:5]:
        share = e.self_cpu_time_total / total
        print(f"  {e.key:45s} {share:5.1%} of the time, {e.count / 20:5.0f} calls per token")


if __name__ == "__main__":
    main()
