"""``homespec bench``: every decoding mode on the same prompts in one run, one table (DESIGN §10).

Runs ``ar`` (in process, the single-machine baseline) and, on one local cluster of ``--stages`` processes
(emulating ``--emulate PROFILE`` when given), ``pp``, ``tree`` and ``specpipe`` with each draft source. Reports per
mode and draft: tokens, pipeline steps, tokens per step (deterministic), time between tokens (median, p90), tokens/s,
acceptance, the speed-ups against ``pp`` and ``tree``, and for emulated runs the TBT that the steps predict.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from homespec.cli.common import ByScoreOption, TimeScaleOption, WaveSizeOption, quiet_libraries, user_errors
from homespec.config import GenerationConfig
from homespec.core.schedule import DEFAULT_BY_SCORE, DEFAULT_WAVE_SIZE
from homespec.errors import ConfigError

DEFAULT_PROMPTS = Path("../shared/bench/specbench-dev.jsonl")
BUILTIN_PROMPTS = [
    "Summarize in one sentence: The quick brown fox jumps over the lazy dog because the dog is lazy.",
    "Write a short poem about the sea.",
    "What is 12 times 13?",
]


def bench(
    model: Annotated[str | None, typer.Argument(help="folder, .gguf or repo id (default: bundled)")] = None,
    stages: Annotated[int, typer.Option("--stages", "-s")] = 4,
    emulate: Annotated[str | None, typer.Option(help="profile JSON to emulate (profiles/*.json)")] = None,
    prompts: Annotated[Path | None, typer.Option(help="JSONL with 'turns' (default: Spec-Bench dev set)")] = None,
    limit: Annotated[int, typer.Option(help="use N prompts spread evenly over the file (0 = all)")] = 0,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n")] = 64,
    drafts: Annotated[str, typer.Option(help="comma-separated draft sources for tree/specpipe")] = "ngram+recycle",
    modes: Annotated[str, typer.Option(help="comma-separated modes")] = "ar,pp,tree,specpipe",
    wave_size: WaveSizeOption = DEFAULT_WAVE_SIZE,
    by_score: ByScoreOption = DEFAULT_BY_SCORE,
    time_scale: TimeScaleOption = 0.0,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the rows as JSON")] = None,
) -> None:
    """Measure every decoding mode on the same prompts; print a table and optionally save JSON."""
    quiet_libraries()
    with user_errors():
        texts = _load_prompts(prompts, limit)
        from homespec.engine import Engine, EngineOptions

        wanted = [m.strip() for m in modes.split(",") if m.strip()]
        draft_list = [d.strip() for d in drafts.split(",") if d.strip()]
        runs = [(m, "none") for m in wanted if m in ("ar", "pp")]
        runs += [(m, d) for m in wanted if m in ("tree", "specpipe") for d in draft_list]
        pipelined = any(m != "ar" for m, _ in runs)
        opts = EngineOptions(
            model=model,
            mode="specpipe" if pipelined else "ar",
            stages=stages,
            wave_size=wave_size,
            by_score=by_score,
            emulate=emulate,
            time_scale=time_scale,
        )
        with Engine(opts) as engine, _progress(len(runs) * len(texts)) as advance:
            ids = [engine.encode(t) for t in texts]
            rows = [_measure(engine, m, d, ids, max_tokens, advance) for m, d in runs]
        _ratios(rows)
        _print(rows, stages, emulate, engine.time_scale)
        if json_out:
            json_out.write_text(json.dumps(rows, indent=2))


def _load_prompts(path: Path | None, limit: int) -> list[str]:
    if path is None:
        path = DEFAULT_PROMPTS if DEFAULT_PROMPTS.is_file() else None
    if path is None:
        texts = list(BUILTIN_PROMPTS)
    else:
        if not path.is_file():
            raise ConfigError(f"prompts file not found: {path}")
        try:
            texts = [json.loads(line)["turns"][0] for line in path.read_text().splitlines() if line.strip()]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
            raise ConfigError(f"{path}: every line must be a JSON object with 'turns': {exc}") from exc
    if 0 < limit < len(texts):  # every k-th, so that each category of a sorted file is represented
        texts = [texts[i * len(texts) // limit] for i in range(limit)]
    return texts


def _measure(engine: Any, mode: str, draft: str, prompts: list[list[int]], n: int, advance: Any) -> dict[str, Any]:
    from homespec.events import GenerationFinished, StepCompleted, TokensCommitted

    gaps: list[float] = []  # time between tokens after the first (the first one's wait is the TTFT)
    ttft: list[float] = []
    tokens = steps = forwards = accepted = flushes = 0
    wall = decode_s = 0.0
    scale = engine.clock_scale(mode)  # emulation: report times on the emulated clock
    engine.fresh_draft(draft)  # every run starts cold; a draft's state carries over between its own prompts only
    for ids in prompts:
        start = last = time.perf_counter()
        first: float | None = None
        for event in engine.generate(ids, GenerationConfig(max_tokens=n), mode=mode, draft=draft):
            if isinstance(event, TokensCommitted):
                now = start + (time.perf_counter() - start) / scale
                if first is None:
                    first = now
                    ttft.append(now - start)
                    k = len(event.tokens) - 1
                else:
                    k = len(event.tokens)
                gaps.extend([(now - last) / max(k, 1)] * k)
                last = now
            elif isinstance(event, StepCompleted):
                accepted += min(event.accepted, event.emitted)
                flushes += int(event.flushed)
            elif isinstance(event, GenerationFinished):
                s = event.stats
                tokens, steps, forwards, wall = (
                    tokens + s.tokens,
                    steps + s.steps,
                    forwards + s.target_forwards,
                    wall + s.wall_s,
                )
        decode_s += last - (first or last)
        advance()
    gaps.sort()
    row: dict[str, Any] = {
        "mode": mode,
        "draft": draft,
        "stages": 1 if mode == "ar" else engine.options.stages,
        "prompts": len(prompts),
        "tokens": tokens,
        "steps": steps,
        "tokens_per_step": tokens / steps if steps else 0.0,
        "tbt_ms_median": 1000 * statistics.median(gaps) if gaps else 0.0,
        "tbt_ms_p90": 1000 * gaps[int(0.9 * (len(gaps) - 1))] if gaps else 0.0,
        "ttft_ms_median": 1000 * statistics.median(ttft) if ttft else 0.0,
        "tokens_per_s": len(gaps) / decode_s if decode_s else 0.0,  # decoding speed, prefill excluded
        "acceptance": accepted / tokens if tokens else 0.0,
        "flushes_per_100_tokens": 100 * flushes / tokens if tokens else 0.0,  # the bonus token was not in the tree
        "wall_s": wall,
        "time_scale": scale,
    }
    modeled = engine.modeled_step_ms()
    if modeled and mode != "ar":
        row["predicted_tbt_ms"] = modeled * steps / tokens if tokens else 0.0
        row["measured_tbt_ms"] = 1000 * decode_s / len(gaps) if gaps else 0.0
    return row


def _ratios(rows: list[dict[str, Any]]) -> None:
    base = {r["mode"]: r["tokens_per_s"] for r in rows if r["mode"] in ("pp", "tree")}
    best_tree = max((r["tokens_per_s"] for r in rows if r["mode"] == "tree"), default=0.0)
    for r in rows:
        r["speedup_vs_pp"] = r["tokens_per_s"] / base["pp"] if base.get("pp") else None
        r["speedup_vs_tree"] = r["tokens_per_s"] / best_tree if best_tree else None


def _print(rows: list[dict[str, Any]], stages: int, emulate: str | None, scale: float) -> None:
    from rich.console import Console
    from rich.table import Table

    title = f"homespec bench: {stages} stages"
    if emulate:
        title += f", emulating {Path(emulate).name} (clock {scale:g}x slower, times shown in emulated ms)"
    table = Table(title=title)
    cols = ["mode", "draft", "stages", "tokens", "steps", "tok/step", "TTFT ms", "TBT med ms", "TBT p90 ms", "tok/s",
            "accept", "vs pp", "vs tree", "TBT ms", "pred TBT ms"]  # fmt: skip
    for c in cols:
        table.add_column(c, justify="left" if c in ("mode", "draft") else "right")

    def f(x: Any, d: int = 2) -> str:
        return "-" if x is None else f"{x:.{d}f}"

    for r in rows:
        table.add_row(
            r["mode"], r["draft"], str(r["stages"]), str(r["tokens"]), str(r["steps"]), f(r["tokens_per_step"]),
            f(r["ttft_ms_median"], 0), f(r["tbt_ms_median"], 1), f(r["tbt_ms_p90"], 1), f(r["tokens_per_s"], 1),
            f(r["acceptance"]), f(r["speedup_vs_pp"]), f(r["speedup_vs_tree"]), f(r.get("measured_tbt_ms"), 1),
            f(r.get("predicted_tbt_ms"), 1),
        )  # fmt: skip
    Console(width=200).print(table)


class _progress:
    """A rich progress bar that counts prompts done."""

    def __init__(self, total: int) -> None:
        from rich.progress import Progress

        self.bar = Progress(transient=True)
        self.total = total

    def __enter__(self) -> Any:
        self.bar.start()
        task = self.bar.add_task("benchmarking", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()
