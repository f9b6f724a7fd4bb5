"""``homespec quantize [MODEL] OUT``: a float checkpoint quantized to 4 bits with GPTQ, calibrated on text, written
as a GPTQ checkpoint folder that ``generate OUT`` (and every worker) runs natively (model/gptq.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from homespec.cli.common import quiet_libraries, user_errors
from homespec.errors import ConfigError


def quantize(
    args: Annotated[
        list[str], typer.Argument(help="[MODEL] OUT: a float checkpoint (folder, .gguf, repo id) and a new folder")
    ],
    group: Annotated[int, typer.Option(help="input columns per scale and zero (32, 64 or 128)")] = 128,
    calibration: Annotated[
        list[Path] | None, typer.Option(help="text files to calibrate on (default: the built-in training prompts)")
    ] = None,
    window: Annotated[int, typer.Option(help="calibration tokens per window")] = 512,
    max_tokens: Annotated[int, typer.Option(help="calibration tokens at most")] = 65536,
    act_order: Annotated[
        bool,
        typer.Option(
            "--act-order/--no-act-order", help="columns by falling input energy, with static groups (GPTQ's desc_act)"
        ),
    ] = True,
) -> None:
    """Quantize MODEL (default: the bundled SmolLM2, dequantized) to int4 with GPTQ into the folder OUT."""
    quiet_libraries()
    with user_errors():
        if len(args) not in (1, 2):
            raise ConfigError(f"expected [MODEL] OUT, got {len(args)} arguments")
        model, out = (None, Path(args[0])) if len(args) == 1 else (args[0], Path(args[1]))
        if group not in (32, 64, 128):
            raise ConfigError(f"--group must be 32, 64 or 128, got {group}")
        texts = None
        if calibration:
            missing = [str(p) for p in calibration if not p.is_file()]
            if missing:
                raise ConfigError(f"calibration file not found: {', '.join(missing)}")
            texts = [p.read_text() for p in calibration]
        from rich.progress import Progress

        from homespec.model.gptq import quantize_checkpoint
        from homespec.model.loader import resolve

        source = resolve(model)
        with Progress(transient=True) as bar:
            task = bar.add_task(f"GPTQ int4, groups of {group}", total=source.num_layers + 1)
            report = quantize_checkpoint(
                source, out, group=group, texts=texts, window=window, max_tokens=max_tokens, act_order=act_order,
                advance=lambda: bar.advance(task),
            )  # fmt: skip
        typer.echo(
            f"{report.linears} linears of {report.layers} layers quantized (int4, groups of {report.group}, "
            f"calibrated on {report.calibration_tokens} tokens) -> {report.folder}"
        )
