"""``homespec bench``: every decoding mode on the same prompts in one run, one table (DESIGN §10).

Runs ``ar`` (in process, the single-machine baseline) and, on one local cluster of ``--stages`` processes
(emulating ``--emulate PROFILE`` when given), ``pp``, ``tree`` and ``specpipe`` with each draft source. Reports per
mode and draft: tokens, pipeline steps, tokens per step (deterministic), time between tokens (median, p90), tokens/s,
acceptance, the speed-ups against ``pp`` and ``tree``, and for emulated runs the TBT that the steps predict.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

import typer

from homespec.cli.common import (
    DEFAULT_DRAFT,
    ByScoreOption,
    ClusterOption,
    DtypeOption,
    TimeScaleOption,
    WaveSizeOption,
    WorkersOption,
    parse_workers,
    quiet_libraries,
    user_errors,
)
from homespec.config import MODES, PIPELINED_MODES, GenerationConfig
from homespec.core.step import DEFAULT_BY_SCORE
from homespec.errors import ConfigError
from homespec.model.baseline import BASELINES

HIT_DEPTHS = 8
BASELINE_DRAFT = "transformers"

DEFAULT_PROMPTS = Path("../shared/bench/specbench-dev.jsonl")
BUILTIN_PROMPTS = [
    "Summarize in one sentence: The quick brown fox jumps over the lazy dog because the dog is lazy.",
    "Write a short poem about the sea.",
    "What is 12 times 13?",
]


def bench(
    model: Annotated[str | None, typer.Argument(help="folder, .gguf or repo id (default: bundled)")] = None,
    stages: Annotated[
        int | None, typer.Option("--stages", "-s", help="stage processes (default 4; remote: the planner's choice)")
    ] = None,
    emulate: Annotated[str | None, typer.Option(help="profile JSON to emulate (profiles/*.json)")] = None,
    prompts: Annotated[Path | None, typer.Option(help="JSONL with 'turns' (default: Spec-Bench dev set)")] = None,
    limit: Annotated[int, typer.Option(help="use N prompts spread evenly over the file (0 = all)")] = 0,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n")] = 64,
    drafts: Annotated[str, typer.Option(help="comma-separated draft sources for ar/tree/specpipe")] = DEFAULT_DRAFT,
    modes: Annotated[str, typer.Option(help="comma-separated modes (hf, hf-lookup: transformers generate)")] = (
        "ar,hf,hf-lookup,pp,tree,specpipe"
    ),
    wave_size: WaveSizeOption = 0,
    by_score: ByScoreOption = DEFAULT_BY_SCORE,
    time_scale: TimeScaleOption = 0.0,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the rows as JSON")] = None,
    concurrency: Annotated[
        str | None,
        typer.Option(help="e.g. 1,2,4,8: serve all prompts at once, this many together, in tree and specpipe"),
    ] = None,
    workers: WorkersOption = None,
    cluster: ClusterOption = None,
    dtype: DtypeOption = "fp32",
    weights: Annotated[
        str,
        typer.Option(help="comma-separated weight formats (auto | fp32 | fp16 | bf16 | int8 | int4): rows for each"),
    ] = "auto",
) -> None:
    """Measure every decoding mode on the same prompts; print tables and optionally save JSON."""
    quiet_libraries()
    with user_errors():
        items = _load_prompts(prompts, limit)
        from homespec.engine import Engine, EngineOptions

        wanted = [m.strip() for m in modes.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in (*MODES, *BASELINES)]
        if unknown:
            raise ConfigError(f"unknown mode(s) {unknown}", hint=f"choose among {(*MODES, *BASELINES)}")
        draft_list = [d.strip() for d in drafts.split(",") if d.strip()]
        runs = [(m, "none") for m in wanted if m in ("ar", "pp")]
        runs += [("ar", d) for d in draft_list if "ar" in wanted and d != "none"]
        runs += [(m, BASELINE_DRAFT) for m in wanted if m in BASELINES]
        runs += [(m, d) for m in wanted if m in ("tree", "specpipe") for d in draft_list]
        pipelined = any(m in PIPELINED_MODES for m, _ in runs)
        remote = parse_workers(workers)
        stages = stages or (1 if remote or cluster else 4)
        # an EAGLE-3 head among the drafts (eagle:PATH, or the shipped one that eagle and auto draft with): the stages
        # start with its taps (they add up its fc; the other drafts read the last hidden states as ever)
        kinds = {d: {p.strip().split(":")[0] for p in d.split("+")} for d in draft_list}
        eagle = next((d for d in draft_list if kinds[d] & {"eagle", "auto"}), None)
        opts = EngineOptions(
            model=model,
            draft=eagle or "none",
            mode="specpipe" if pipelined else "ar",
            stages=stages,
            wave_size=wave_size,
            by_score=by_score,
            emulate=emulate,
            time_scale=time_scale,
            workers=remote,
            cluster=cluster,
            max_concurrency=256 if concurrency is not None else 8,
            dtype=dtype,
        )
        asked = [w.strip() for w in weights.split(",") if w.strip()] or ["auto"]
        if concurrency is not None:
            if len(asked) > 1:
                raise ConfigError("--concurrency measures one weight format at a time", hint="give one --weights")
            levels, pipelined_modes = _concurrency_levels(
                concurrency, wanted, stages
            )  # checked before any stage starts
            engine = Engine(replace(opts, weights=asked[0]))
            _bench_concurrency(
                engine, items, levels, pipelined_modes, draft_list, max_tokens, stages, emulate, json_out
            )
            return
        formats = _formats(opts, asked)
        rows: list[dict[str, Any]] = []
        with _progress(len(runs) * len(items) * len(formats)) as advance:
            for i, fmt in enumerate(formats):
                todo = [(m, d) for m, d in runs if i == 0 or m not in BASELINES]  # transformers' rows once
                with Engine(replace(opts, weights=fmt)) as engine:
                    ids = [engine.encode(text) for text, _ in items]
                    categories = [c for _, c in items]
                    baseline = _baseline(engine) if any(m in BASELINES for m, _ in todo) else None
                    rows += [_measure(engine, baseline, m, d, ids, categories, max_tokens, advance) for m, d in todo]
        _ratios(rows)
        _print(rows, stages, emulate, engine.clock_scale(opts.mode))
        if json_out:
            json_out.write_text(json.dumps(rows, indent=2))


def _concurrency_levels(levels_arg: str, wanted: list[str], stages: int) -> tuple[list[int], list[str]]:
    """``--concurrency``'s levels and the pipelined modes it measures, or a ConfigError."""
    try:
        levels = sorted({int(x) for x in levels_arg.split(",") if x.strip()})
    except ValueError as exc:
        raise ConfigError(f"--concurrency takes integers like 1,2,4,8, got {levels_arg!r}") from exc
    if not levels or levels[0] < 1 or levels[-1] > 256:
        raise ConfigError(f"--concurrency levels must be in [1, 256], got {levels_arg!r}")
    modes: list[str] = [m for m in ("tree", "specpipe") if m in wanted]
    if not modes or stages < 2:
        raise ConfigError("--concurrency measures the pipelined modes", hint="--stages >= 2, --modes tree,specpipe")
    return levels, modes


def _bench_concurrency(
    engine: Any, items: list[tuple[str, str]], levels: list[int], modes: list[str], drafts: list[str], n: int,
    stages: int, emulate: str | None, json_out: Path | None,
) -> None:  # fmt: skip
    from homespec.cli.bench_concurrency import print_levels, run_levels

    with engine:
        rows = run_levels(engine, [engine.encode(text) for text, _ in items], modes, drafts, levels, n)
    print_levels(rows, stages, emulate)
    if json_out:
        json_out.write_text(json.dumps(rows, indent=2))


def _load_prompts(path: Path | None, limit: int) -> list[tuple[str, str]]:
    """(text, category) of each prompt; the category is ``-`` where the file has none."""
    if path is None:
        path = DEFAULT_PROMPTS if DEFAULT_PROMPTS.is_file() else None
    if path is None:
        items = [(t, "-") for t in BUILTIN_PROMPTS]
    else:
        if not path.is_file():
            raise ConfigError(f"prompts file not found: {path}")
        try:
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            items = [(str(d["turns"][0]), str(d.get("category", "-"))) for d in lines]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{path}: every line must be a JSON object with 'turns': {exc}") from exc
    if 0 < limit < len(items):  # every k-th, so that each category of a sorted file is represented
        items = [items[i * len(items) // limit] for i in range(limit)]
    return items


@dataclass
class _PromptRun:
    """What one prompt's generation gave, on the reported clock."""

    category: str
    tokens: int = 0
    steps: int = 0
    accepted: int = 0
    flushes: int = 0
    ttft_s: float = 0.0
    decode_s: float = 0.0  # from the first token to the last
    gaps: list[float] = field(default_factory=list)  # time between tokens after the first
    runs: list[int] = field(default_factory=list)  # accepted drafts between two fresh (not drafted) tokens
    output: list[int] = field(default_factory=list)  # the tokens it gave (every mode must give the same)

    def committed(self, at: float, last: float, n: int, first: bool) -> None:
        k = n - 1 if first else n
        self.gaps.extend([(at - last) / max(k, 1)] * k)


def _measure(
    engine: Any,
    baseline: Any,
    mode: str,
    draft: str,
    prompts: list[list[int]],
    categories: list[str],
    n: int,
    advance: Any,
) -> dict[str, Any]:
    if mode in BASELINES:
        done = [_run_baseline(baseline, mode, ids, cat, n) for ids, cat in zip(prompts, categories, strict=True)]
        for _ in done:
            advance()
    else:
        engine.fresh_draft(draft)  # every run starts cold; a draft's state carries over between its own prompts only
        done = []
        for ids, cat in zip(prompts, categories, strict=True):
            done.append(_run_engine(engine, mode, draft, ids, cat, n))
            advance()
    row: dict[str, Any] = {
        "mode": mode,
        "draft": draft,
        "stages": engine.stage_count(mode),
        "weights": "fp32" if mode in BASELINES else engine.options.weights,  # transformers: fp32, dequantized
        "prompts": len(prompts),
        **_summary(done),
        "time_scale": engine.clock_scale(mode) if mode in MODES else 1.0,
        "output_sha256": _digest([r.output for r in done]),
    }
    row["by_category"] = {c: _summary([r for r in done if r.category == c]) for c in dict.fromkeys(categories)}
    modeled = engine.modeled_step_ms()
    if modeled and mode in PIPELINED_MODES:
        row["predicted_tbt_ms"] = modeled * row["steps"] / row["tokens"] if row["tokens"] else 0.0
        row["measured_tbt_ms"] = 1000 * row["decode_s"] / row["gaps"] if row["gaps"] else 0.0
    return row


def _digest(outputs: list[list[int]]) -> str:
    """One hash of every prompt's tokens: rows with equal digests gave token-identical outputs."""
    return hashlib.sha256(json.dumps(outputs).encode()).hexdigest()


def _run_engine(engine: Any, mode: str, draft: str, ids: list[int], category: str, n: int) -> _PromptRun:
    from homespec.events import GenerationFinished, StepCompleted, TokensCommitted

    run = _PromptRun(category)
    scale = engine.clock_scale(mode)  # emulation: report times on the emulated clock
    start = last = time.perf_counter()
    first: float | None = None
    streak = 0
    for event in engine.generate(ids, GenerationConfig(max_tokens=n), mode=mode, draft=draft):
        if isinstance(event, TokensCommitted):
            now = start + (time.perf_counter() - start) / scale
            run.committed(now, last, len(event.tokens), first is None)
            if first is None:
                first = now
                run.ttft_s = now - start
            last = now
        elif isinstance(event, StepCompleted):
            run.accepted += min(event.accepted, event.emitted)
            run.flushes += int(event.flushed)
            streak += event.accepted
            if event.flushed:
                run.runs.append(streak)
                streak = 0
        elif isinstance(event, GenerationFinished):
            run.tokens, run.steps, run.output = event.stats.tokens, event.stats.steps, list(event.tokens)
    run.decode_s = last - (first or last)
    return run


def _run_baseline(baseline: Any, mode: str, ids: list[int], category: str, n: int) -> _PromptRun:
    start = time.perf_counter()
    out = baseline.generate(ids, n, mode)
    run = _PromptRun(category, tokens=len(out.tokens), steps=out.forwards, output=list(out.tokens))
    run.accepted = max(0, run.tokens - run.steps)  # each forward commits one token plus the lookups it accepted
    times = out.commit_times[1:]  # the first put is the prompt
    last = start
    for i, (at, k) in enumerate(times):
        run.committed(at, last, k, i == 0)
        last = at
    if times:
        run.ttft_s = times[0][0] - start
        run.decode_s = times[-1][0] - times[0][0]
    return run


def _summary(runs: list[_PromptRun]) -> dict[str, Any]:
    """Totals and rates over some prompts' runs (one table row, or one category of it)."""
    tokens, steps = sum(r.tokens for r in runs), sum(r.steps for r in runs)
    gaps = sorted(g for r in runs for g in r.gaps)
    decode_s = sum(r.decode_s for r in runs)
    ttft = [r.ttft_s for r in runs if r.tokens]
    streaks = [s for r in runs for s in r.runs]
    hits = []  # hit rate per depth: of the streaks that reached depth d - 1, the share that reached d
    for d in range(1, HIT_DEPTHS + 1):
        reached = sum(1 for s in streaks if s >= d - 1)
        hits.append(sum(1 for s in streaks if s >= d) / reached if reached else 0.0)
    return {
        "tokens": tokens,
        "steps": steps,
        "tokens_per_step": tokens / steps if steps else 0.0,
        "tbt_ms_median": 1000 * statistics.median(gaps) if gaps else 0.0,
        "tbt_ms_p90": 1000 * gaps[int(0.9 * (len(gaps) - 1))] if gaps else 0.0,
        "ttft_ms_median": 1000 * statistics.median(ttft) if ttft else 0.0,
        "tokens_per_s": len(gaps) / decode_s if decode_s else 0.0,  # decoding speed, prefill excluded
        "acceptance": sum(r.accepted for r in runs) / tokens if tokens else 0.0,
        "flushes_per_100_tokens": 100 * sum(r.flushes for r in runs) / tokens if tokens else 0.0,
        "hit_by_depth": hits,
        "decode_s": decode_s,
        "gaps": len(gaps),
    }


def _formats(opts: Any, asked: list[str]) -> list[str]:
    """The weight formats to measure, each once: ``auto`` resolved for this model and device (the line that says
    what it chose printed), so that ``auto,int4`` on a 4-bit file measures int4 once."""
    from homespec.model.formats import check_format, resolve_weights
    from homespec.model.loader import resolve

    source = resolve(opts.model)
    out: list[str] = []
    for fmt in asked:
        check_format(fmt, opts.dtype)
        concrete, notice = resolve_weights(source, fmt, opts.dtype, opts.device)
        if notice:
            typer.echo(notice, err=True)
        if concrete not in out:
            out.append(concrete)
    return out


def _baseline(engine: Any) -> Any:
    from homespec.model.baseline import TransformersBaseline

    return TransformersBaseline(engine.source.folder, eos_ids=sorted(engine.eos_ids))


def _ratios(rows: list[dict[str, Any]]) -> None:
    """Speed-ups in tokens/s against pp and the best tree row of the same weight format, and transformers with
    prompt lookup, overall and per category."""

    def find(mode: str, weights: str | None = None) -> dict[str, Any] | None:
        candidates = [r for r in rows if r["mode"] == mode and weights in (None, r["weights"])]
        return max(candidates, key=lambda r: r["tokens_per_s"]) if candidates else None

    for r in rows:
        bases = {"pp": find("pp", r["weights"]), "tree": find("tree", r["weights"]), "hf_lookup": find("hf-lookup")}
        for name, base in bases.items():
            r[f"speedup_vs_{name}"] = (
                r["tokens_per_s"] / base["tokens_per_s"] if base and base["tokens_per_s"] else None
            )
            for cat, summary in r["by_category"].items():
                b = base["by_category"].get(cat) if base else None
                ratio = summary["tokens_per_s"] / b["tokens_per_s"] if b is not None and b["tokens_per_s"] else None
                summary[f"speedup_vs_{name}"] = ratio


def _print(rows: list[dict[str, Any]], stages: int, emulate: str | None, scale: float) -> None:
    """The main table, then tokens per step and speed-up by category, then hit rate by depth."""
    from rich.console import Console
    from rich.table import Table

    pipelined = any(r["mode"] in PIPELINED_MODES for r in rows)
    title = f"homespec bench: {stages} stages" if pipelined else "homespec bench: one process"
    if emulate and pipelined:
        title += f", emulating {Path(emulate).name} (clock {scale:g}x slower, times shown in emulated ms)"
    table = Table(title=title)
    cols = ["mode", "draft", "weights", "stages", "tokens", "steps", "tok/step", "TTFT ms", "TBT med ms", "TBT p90 ms",
            "tok/s", "accept", "vs pp", "vs tree", "vs hf-lookup", "TBT ms", "pred TBT ms"]  # fmt: skip
    for c in cols:
        table.add_column(c, justify="left" if c in ("mode", "draft", "weights") else "right")
    for r in rows:
        table.add_row(
            r["mode"], r["draft"], r["weights"], str(r["stages"]), str(r["tokens"]), str(r["steps"]),
            _f(r["tokens_per_step"]),
            _f(r["ttft_ms_median"], 0), _f(r["tbt_ms_median"], 1), _f(r["tbt_ms_p90"], 1), _f(r["tokens_per_s"], 1),
            _f(r["acceptance"]), _f(r["speedup_vs_pp"]), _f(r["speedup_vs_tree"]), _f(r["speedup_vs_hf_lookup"]),
            _f(r.get("measured_tbt_ms"), 1), _f(r.get("predicted_tbt_ms"), 1),
        )  # fmt: skip
    console = Console(width=200)
    console.print(table)
    categories = list(rows[0]["by_category"]) if rows else []
    if len(categories) > 1:
        by_cat = Table(title="tokens per step by category (speed-up vs pp | vs hf-lookup)")
        for c in ["mode", "draft", *categories]:
            by_cat.add_column(c, justify="left" if c in ("mode", "draft") else "right")
        for r in rows:
            cells = []
            for c in categories:
                s = r["by_category"][c]
                ratio = s["speedup_vs_pp"] if r["mode"] in PIPELINED_MODES else s["speedup_vs_hf_lookup"]
                cells.append(f"{s['tokens_per_step']:.2f} ({_f(ratio)}x)")
            by_cat.add_row(r["mode"], r["draft"], *cells)
        console.print(by_cat)
    hits = Table(title="hit rate by depth: of the draft streaks that reached depth d - 1, the share that reached d")
    for c in ["mode", "draft", *(f"d{d}" for d in range(1, HIT_DEPTHS + 1))]:
        hits.add_column(c, justify="left" if c in ("mode", "draft") else "right")
    for r in rows:
        if r["draft"] not in ("none", BASELINE_DRAFT):
            hits.add_row(r["mode"], r["draft"], *(_f(h) for h in r["hit_by_depth"]))
    console.print(hits)
    for fmt in dict.fromkeys(r["weights"] for r in rows):  # each weight format computes its own tokens
        group = [r for r in rows if r["weights"] == fmt]
        reference = next((r for r in group if r["mode"] == "hf"), group[0])
        digest = reference["output_sha256"]
        differ = [f"{r['mode']}/{r['draft']}" for r in group if r["output_sha256"] != digest]
        if differ:  # greedy is lossless in every mode: a difference is a bug (or a near-tie the dtype decides)
            where = f"{reference['mode']}/{reference['draft']}"
            console.print(f"[bold red]{fmt} weights: tokens differ from {where}'s: {', '.join(differ)}[/]")
        else:
            console.print(f"{fmt} weights: every row gave the same tokens (sha256 {digest[:12]})")


def _f(x: Any, d: int = 2) -> str:
    return "-" if x is None else f"{x:.{d}f}"


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
