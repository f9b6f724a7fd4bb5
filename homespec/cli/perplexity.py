"""``homespec perplexity [MODEL] FILE``: teacher-forced negative log-likelihood and perplexity of a text file, in
any weight format, the model cut into ``--stages`` in-process stages as generate would cut it (model/perplexity.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from homespec.cli.common import DeviceOption, DtypeOption, WeightsOption, quiet_libraries, user_errors
from homespec.errors import ConfigError


def perplexity(
    args: Annotated[list[str], typer.Argument(help="[MODEL] FILE: a text file, scored as one document")],
    stages: Annotated[int, typer.Option("--stages", "-s", help="in-process stages (same math as stage processes)")] = 1,
    window: Annotated[int, typer.Option(help="tokens per window, each scored from a fresh cache")] = 512,
    dtype: DtypeOption = "fp32",
    weights: WeightsOption = "auto",
    device: DeviceOption = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help='print {"tokens", "nll", "perplexity"}')] = False,
) -> None:
    """Teacher-forced perplexity of FILE under MODEL (default: the bundled SmolLM2), e.g. to check a weight format."""
    quiet_libraries()
    with user_errors():
        if len(args) not in (1, 2):
            raise ConfigError(f"expected [MODEL] FILE, got {len(args)} arguments")
        model, path = (None, Path(args[0])) if len(args) == 1 else (args[0], Path(args[1]))
        if not path.is_file():
            raise ConfigError(f"text file not found: {path}")
        from rich.progress import Progress

        from homespec.core.planner import even_split
        from homespec.engine import EngineOptions
        from homespec.model.loader import resolve
        from homespec.model.perplexity import score, text_ids
        from homespec.model.stage import Stage, parse_dtype

        options = EngineOptions(model=model, dtype=dtype, weights=weights, device=device)  # validates the pair
        source = resolve(options.model)
        from homespec.model.formats import resolve_weights

        weights, notice = resolve_weights(source, weights, dtype, device)
        if notice and not as_json:
            typer.echo(notice, err=True)
        if not (1 <= stages <= source.num_layers):
            raise ConfigError(f"--stages must be in [1, {source.num_layers}], got {stages}")
        act = parse_dtype(dtype)
        parts = [
            Stage(source, a, b, dtype=act, device=device, weights=weights)
            for a, b in even_split(source.num_layers, stages)
        ]
        ids, bos = text_ids(source.tokenizer(), path.read_text())
        with Progress(transient=True, disable=as_json) as bar:
            task = bar.add_task(f"scoring {path.name}", total=len(ids))
            result = score(parts, ids, window, lambda n: bar.advance(task, n), bos=bos)
        if as_json:
            typer.echo(json.dumps({"tokens": result.tokens, "nll": result.nll, "perplexity": result.perplexity}))
        else:
            held = sum(s.weight_bytes for s in parts) / 1e6
            typer.echo(
                f"{result.tokens} tokens, NLL {result.nll:.4f} nats, perplexity {result.perplexity:.3f} "
                f"({weights} weights, {held:.1f} MB held)"
            )
