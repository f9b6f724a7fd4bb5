"""Single-process (mode ``ar``) draft-source measurement on Spec-Bench prompts: tokens per target forward
(deterministic) and wall time per token, per draft source and tree shape, per category. Until ``homespec bench``
(the pipeline issue) exists, this is how BENCHMARKS.md's single-process table is made.

    .venv/bin/python benchmarks/ar_drafts.py --max-tokens 64 none ngram early-exit ngram@16,8,2
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from homespec.config import GenerationConfig, TreeConfig
from homespec.engine import Engine, EngineOptions
from homespec.events import GenerationFinished

DEFAULT_PROMPTS = Path(__file__).resolve().parents[2] / "shared" / "bench" / "specbench-dev.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("drafts", nargs="+", help="draft spec, optionally @budget,depth,width")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--limit", type=int, default=0, help="N prompts spread evenly over the file (0 = all)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    prompts = [json.loads(line) for line in args.prompts.read_text().splitlines() if line.strip()]
    if 0 < args.limit < len(prompts):
        prompts = [prompts[i * len(prompts) // args.limit] for i in range(args.limit)]
    rows = []
    for spec in args.drafts:
        draft, _, shape = spec.partition("@")
        tree = TreeConfig(*map(int, shape.split(","))) if shape else None  # None: the mode's default
        engine = Engine(EngineOptions(draft=draft, tree=tree or TreeConfig()))
        per_cat: dict[str, list[tuple[int, int, float]]] = defaultdict(list)
        for p in prompts:
            ids = engine.encode(p["turns"][0])
            done = list(engine.generate(ids, GenerationConfig(max_tokens=args.max_tokens, tree=tree)))[-1]
            assert isinstance(done, GenerationFinished)
            s = done.stats
            per_cat[p["category"]].append((s.tokens, s.target_forwards, s.wall_s))
        all_runs = [r for runs in per_cat.values() for r in runs]
        row = {
            "draft": spec,
            "prompts": len(all_runs),
            "tokens": sum(r[0] for r in all_runs),
            "forwards": sum(r[1] for r in all_runs),
            "tokens_per_forward": sum(r[0] for r in all_runs) / sum(r[1] for r in all_runs),
            "ms_per_token": 1000 * sum(r[2] for r in all_runs) / sum(r[0] for r in all_runs),
            "ms_per_token_median": 1000 * statistics.median(r[2] / r[0] for r in all_runs),
            "by_category": {
                c: round(sum(r[0] for r in runs) / sum(r[1] for r in runs), 2) for c, runs in sorted(per_cat.items())
            },
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
