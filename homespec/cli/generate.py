"""``homespec generate [MODEL] PROMPT``: one-shot generation, streamed to stdout; ``--json`` for scripts."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from homespec.cli.common import (
    DEFAULT_DRAFT,
    ByScoreOption,
    ClusterOption,
    PeerTimeoutOption,
    TimeScaleOption,
    WaveSizeOption,
    WeightsOption,
    WorkersOption,
    engine_options,
    quiet_libraries,
    user_errors,
)
from homespec.config import DRAFT_SPECS, GenerationConfig, SamplingConfig, TreeConfig, default_tree
from homespec.core.step import DEFAULT_BY_SCORE
from homespec.errors import ConfigError


def generate(
    args: Annotated[list[str], typer.Argument(help="[MODEL] PROMPT: MODEL is a folder, .gguf or repo id")],
    mode: Annotated[
        str | None, typer.Option(help="ar | pp | tree | specpipe (default: ar, or specpipe with --stages > 1)")
    ] = None,
    stages: Annotated[int, typer.Option("--stages", "-s", help="stage processes for pp/tree/specpipe")] = 1,
    wave_size: WaveSizeOption = 0,
    by_score: ByScoreOption = DEFAULT_BY_SCORE,
    emulate: Annotated[str | None, typer.Option(help="emulate a cluster profile (profiles/*.json)")] = None,
    time_scale: TimeScaleOption = 0.0,
    draft: Annotated[str, typer.Option(help=f"draft source: {DRAFT_SPECS}")] = DEFAULT_DRAFT,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="most new tokens")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", help="0 = off")] = 0,
    seed: Annotated[int, typer.Option(help="sampling seed (keyed per position)")] = 0,
    chat: Annotated[bool | None, typer.Option("--chat/--no-chat", help="apply the chat template")] = None,
    tree_budget: Annotated[int | None, typer.Option("--tree-budget", help="draft nodes per step")] = None,
    tree_depth: Annotated[int | None, typer.Option("--tree-depth", help="draft levels per step")] = None,
    tree_width: Annotated[int | None, typer.Option("--tree-width", help="branches per level")] = None,
    dtype: Annotated[str, typer.Option(help="fp32 | fp16 | bf16")] = "fp32",
    weights: WeightsOption = "auto",
    device: Annotated[str, typer.Option(help="cpu | cuda:N | mps")] = "cpu",
    max_context: Annotated[int, typer.Option("--max-context")] = 4096,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object at the end")] = False,
    stats: Annotated[bool, typer.Option("--stats", help="print stats to stderr at the end")] = False,
    workers: WorkersOption = None,
    cluster: ClusterOption = None,
    peer_timeout: PeerTimeoutOption = 10.0,
) -> None:
    """Generate a reply to PROMPT and stream it to stdout."""
    quiet_libraries()
    with user_errors():
        if len(args) not in (1, 2):
            raise ConfigError(f"expected [MODEL] PROMPT, got {len(args)} arguments")
        model, prompt = (None, args[0]) if len(args) == 1 else (args[0], args[1])
        options = engine_options(model, stages, mode, draft, wave_size, by_score, emulate, time_scale, dtype, device,
                                 max_context, workers, cluster, peer_timeout, weights)  # fmt: skip
        tree = None  # the mode's and device's default (config.default_tree) unless one is given
        if (tree_budget, tree_depth, tree_width) != (None, None, None):
            base = default_tree(options.mode, device)
            tree = TreeConfig(
                base.budget if tree_budget is None else tree_budget,
                base.depth if tree_depth is None else tree_depth,
                base.width if tree_width is None else tree_width,
            )
        config = GenerationConfig(
            max_tokens=max_tokens,
            sampling=SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed),
            tree=tree,
        )
        from dataclasses import replace

        from homespec.engine import Engine

        engine = Engine(replace(options, tree=config.tree or TreeConfig()))
        if engine.notice:
            typer.echo(engine.notice, err=True)
        with engine:
            finished = _run(engine, engine.encode(prompt, chat), config, as_json)
        if as_json:
            payload = {"text": finished.text, "tokens": list(finished.tokens), "finish_reason": finished.reason}
            payload["stats"] = finished.stats.as_dict()
            typer.echo(json.dumps(payload))
        else:
            typer.echo("")
        if stats:
            s = finished.stats
            typer.echo(
                f"{s.tokens} tokens in {s.wall_s:.2f}s ({s.tokens_per_s:.1f} tok/s), {s.target_forwards} target "
                f"forwards ({s.tokens_per_forward:.2f} tokens/forward), {s.steps} steps ({s.tokens_per_step:.2f} "
                f"tokens/step), mode {s.mode}, {s.stages} stage(s), draft {s.draft}",
                err=True,
            )


def _run(engine: Any, ids: list[int], config: GenerationConfig, as_json: bool) -> Any:
    from homespec.events import GenerationFinished, TokensCommitted

    finished = None
    for event in engine.generate(ids, config):
        if isinstance(event, TokensCommitted) and not as_json:
            sys.stdout.write(event.text)
            sys.stdout.flush()
        elif isinstance(event, GenerationFinished):
            finished = event
    return finished
