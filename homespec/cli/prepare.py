"""``homespec prepare [MODEL]``: resolve a model now (dequantize a GGUF into the cache; with ``--weights int4|int8``
quantize a float checkpoint into the quantization cache), so later runs are fast."""

from __future__ import annotations

from typing import Annotated

import typer

from homespec.cli.common import WeightsOption, quiet_libraries, user_errors


def prepare(
    model: Annotated[str | None, typer.Argument(help="folder, .gguf or repo id")] = None,
    weights: WeightsOption = "auto",
) -> None:
    """Resolve MODEL (default: the bundled SmolLM2) and print where its safetensors live; with ``--weights int4`` or
    ``int8``, quantize a float checkpoint now, one layer at a time, into the cache later loads read."""
    quiet_libraries()
    with user_errors():
        from homespec.model.formats import QUANTIZED_FORMATS, check_format
        from homespec.model.loader import resolve

        check_format(weights, "fp32" if weights not in ("fp16", "bf16") else weights)
        source = resolve(model)
        cfg = source.config
        typer.echo(
            f"{source.name}: {cfg.model_type}, {source.num_layers} layers, hidden {cfg.hidden_size}, "
            f"vocab {cfg.vocab_size} -> {source.folder}"
        )
        if weights not in QUANTIZED_FORMATS or source.gguf is not None or source.prequantized:
            return
        from rich.progress import Progress

        from homespec.model.formats import QuantCache
        from homespec.model.stage import Stage

        with Progress(transient=True) as bar:
            task = bar.add_task(f"quantizing to {weights}", total=source.num_layers + 1)
            Stage(source, 0, 0, embed=True, head=True, weights=weights)
            bar.advance(task)
            for i in range(source.num_layers):
                Stage(source, i, i + 1, embed=False, head=False, weights=weights)
                bar.advance(task)
        typer.echo(f"{weights} weights cached in {QuantCache(source.digest(weights), weights).folder}")
