"""``homespec bench --concurrency 1,2,4,8``: many requests at once (SpecPipe-DB, DESIGN §4.2).

For each mode and concurrency level c, every prompt is submitted at once and served by a ``Batch`` that decodes up
to c of them together, admitting the next waiting one whenever one finishes (continuous batching); c = 1 is serving
them one at a time. Reports throughput (tokens/s over all requests), per-request time between tokens (median over
requests of each request's decode time / its tokens after the first), pipeline steps and tokens per step, and the
ratios to c = 1 of the same mode. Times are on the emulated clock when a profile is emulated.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from homespec.config import GenerationConfig
from homespec.events import GenerationFinished, TokensCommitted


def run_levels(
    engine: Any, prompts: list[list[int]], modes: Sequence[str], drafts: list[str], levels: list[int], n: int
) -> list[dict[str, Any]]:
    """One row per (mode, draft, level); ratios against the first level of the same mode and draft (give 1 first)."""
    rows = []
    for mode, draft in [(m, d) for m in modes for d in drafts]:
        ours = [_serve_all(engine, mode, draft, c, prompts, n) for c in levels]
        rows += ours
        solo = ours[0]
        for r in ours:
            r["throughput_vs_solo"] = r["tokens_per_s"] / solo["tokens_per_s"] if solo["tokens_per_s"] else 0.0
            r["tbt_vs_solo"] = r["tbt_ms"] / solo["tbt_ms"] if solo["tbt_ms"] else 0.0
    return rows


def _serve_all(engine: Any, mode: str, draft: str, c: int, prompts: list[list[int]], n: int) -> dict[str, Any]:
    from homespec.batching import Batch

    batch = Batch(engine, c, mode=mode)  # a fresh draft pool: every level starts cold
    scale = engine.clock_scale(mode)
    waiting = deque(range(len(prompts)))
    owner: dict[int, int] = {}  # batch id -> prompt index
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    tokens: dict[int, int] = {}
    outputs: dict[int, list[int]] = {}  # prompt index -> its tokens (each must equal its solo run)
    steps = 0
    start = time.perf_counter()
    while waiting or batch.active:
        while waiting and batch.has_room:
            i = waiting.popleft()
            owner[batch.add(prompts[i], GenerationConfig(max_tokens=n), draft)] = i
        for b, events in batch.step().items():
            now = (time.perf_counter() - start) / scale
            i = owner[b]
            for e in events:
                if isinstance(e, TokensCommitted) and e.tokens:
                    first.setdefault(i, now)
                    last[i] = now
                elif isinstance(e, GenerationFinished):
                    tokens[i], outputs[i] = e.stats.tokens, list(e.tokens)
        steps += 1
    wall = (time.perf_counter() - start) / scale
    total = sum(tokens.values())
    tbts = [1000 * (last[i] - first[i]) / (tokens[i] - 1) for i in tokens if tokens[i] > 1]
    return {
        "mode": mode,
        "draft": draft,
        "concurrency": c,
        "requests": len(prompts),
        "tokens": total,
        "steps": steps,
        "tokens_per_step": total / steps if steps else 0.0,
        "wall_s": wall,
        "tokens_per_s": total / wall if wall else 0.0,
        "tbt_ms": statistics.median(tbts) if tbts else 0.0,
        "time_scale": scale,
        "output_sha256": _digest([outputs[i] for i in range(len(prompts))]),
    }


def _digest(outputs: list[list[int]]) -> str:
    """One hash of every request's tokens, in prompt order: equal at every level when batching is lossless."""
    return hashlib.sha256(json.dumps(outputs).encode()).hexdigest()


def print_levels(rows: list[dict[str, Any]], stages: int, emulate: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    where = f"emulating {emulate}" if emulate else "real time"
    table = Table(title=f"{stages} stages, {where}: many requests at once (ratios vs. concurrency 1)")
    for col in ("mode", "draft", "concurrency", "requests", "tokens", "steps", "tokens/step", "tokens/s", "TBT ms"):
        table.add_column(col, justify="right")
    table.add_column("throughput ×", justify="right")
    table.add_column("TBT ×", justify="right")
    for r in rows:
        table.add_row(
            r["mode"], r["draft"], str(r["concurrency"]), str(r["requests"]), str(r["tokens"]), str(r["steps"]),
            f"{r['tokens_per_step']:.3f}", f"{r['tokens_per_s']:.2f}", f"{r['tbt_ms']:.1f}",
            f"{r['throughput_vs_solo']:.2f}", f"{r['tbt_vs_solo']:.2f}",
        )  # fmt: skip
    console = Console()
    console.print(table)
    differ = [
        f"{r['mode']}/{r['draft']} x{r['concurrency']}" for r in rows if r["output_sha256"] != rows[0]["output_sha256"]
    ]
    if differ:
        console.print(f"[bold red]tokens differ from the first row's: {', '.join(differ)}[/]")
    elif rows:
        console.print(f"every level gave every request its solo tokens (sha256 {rows[0]['output_sha256'][:12]})")
