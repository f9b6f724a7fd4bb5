"""``homespec prepare [MODEL]``: resolve a model now (dequantize a GGUF into the cache), so later runs are fast."""

from __future__ import annotations

from typing import Annotated

import typer

from homespec.cli.common import quiet_libraries, user_errors


def prepare(model: Annotated[str | None, typer.Argument(help="folder, .gguf or repo id")] = None) -> None:
    """Resolve MODEL (default: the bundled SmolLM2) and print where its safetensors live."""
    quiet_libraries()
    with user_errors():
        from homespec.model.loader import resolve

        source = resolve(model)
        cfg = source.config
        typer.echo(
            f"{source.name}: {cfg.model_type}, {source.num_layers} layers, hidden {cfg.hidden_size}, "
            f"vocab {cfg.vocab_size} -> {source.folder}"
        )
