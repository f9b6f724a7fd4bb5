"""Per-token cost of a quantized stage with stacked q/k/v and gate/up (``_Layer.fuse``) against the same stage
multiplying each part alone, in one process, alternating (BENCHMARKS.md §6). Both stages hold the same weights; the
script also checks that their logits are bit-identical.

    .venv/bin/python benchmarks/stacked_projections.py --threads 2 --dtype float32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import homespec.model.stage as stage_module
from homespec.model.loader import resolve


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", help="activations: float32 or bfloat16")
    parser.add_argument("--weights", default="int4")
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    source = resolve(args.model)
    dtype = getattr(torch, args.dtype)
    stacked = stage_module.Stage(source, 0, source.num_layers, weights=args.weights, dtype=dtype)
    stage_module._Layer.fuse = lambda self, rows: None  # type: ignore[method-assign]
    alone = stage_module.Stage(source, 0, source.num_layers, weights=args.weights, dtype=dtype)
    prompt = torch.randint(0, 1000, (200,), generator=torch.Generator().manual_seed(0))
    state = {}
    for name, stage in (("stacked", stacked), ("alone", alone)):
        cache = stage.new_cache(max_context=2048, max_tree=4)
        stage.forward_prefix(cache, prompt, range(200))
        state[name] = [stage, cache, 200]
    times: dict[str, list[float]] = {"stacked": [], "alone": []}
    last: dict[str, list[torch.Tensor]] = {"stacked": [], "alone": []}
    for _ in range(args.rounds):
        for name in times:
            stage, cache, pos = state[name]
            start = time.perf_counter()
            for _ in range(20):
                out = stage.forward_prefix(cache, torch.tensor([5]), range(pos, pos + 1))
                pos += 1
            times[name].append((time.perf_counter() - start) / 20 * 1e3)
            state[name][2] = pos
            last[name].append(out)
    for name, t in times.items():
        print(f"{name}: median {statistics.median(t):.2f} ms per token, min {min(t):.2f} ({args.rounds} x 20 tokens)")
    same = all(torch.equal(a, b) for a, b in zip(last["stacked"], last["alone"], strict=True))
    print(f"bit-identical logits: {same}")


if __name__ == "__main__":
    main()
