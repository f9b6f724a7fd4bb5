"""``homespec chat [MODEL]``: the Textual chat app with the live token tree and the stage bars (DESIGN §9)."""

from __future__ import annotations

from typing import Annotated

import typer

from homespec.cli.common import (
    DEFAULT_DRAFT,
    ByScoreOption,
    ClusterOption,
    DeviceOption,
    DtypeOption,
    EmulateOption,
    MaxContextOption,
    ModeOption,
    PeerTimeoutOption,
    StagesOption,
    TimeScaleOption,
    WaveSizeOption,
    WeightsOption,
    WorkersOption,
    engine_options,
    quiet_libraries,
    user_errors,
)
from homespec.core.step import DEFAULT_BY_SCORE


def chat(
    model: Annotated[str | None, typer.Argument(help="a folder, .gguf or repo id (default: the bundled model)")] = None,
    stages: StagesOption = 1,
    mode: ModeOption = None,
    draft: Annotated[str, typer.Option(help="draft source")] = DEFAULT_DRAFT,
    wave_size: WaveSizeOption = 0,
    by_score: ByScoreOption = DEFAULT_BY_SCORE,
    emulate: EmulateOption = None,
    time_scale: TimeScaleOption = 0.0,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="most new tokens per reply")] = 512,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    seed: Annotated[int, typer.Option(help="sampling seed (keyed per position)")] = 0,
    dtype: DtypeOption = "fp32",
    weights: WeightsOption = "auto",
    device: DeviceOption = "cpu",
    max_context: MaxContextOption = 4096,
    workers: WorkersOption = None,
    cluster: ClusterOption = None,
    peer_timeout: PeerTimeoutOption = 10.0,
) -> None:
    """Chat with the model in the terminal, watching the speculation live (token tree, stage utilization)."""
    quiet_libraries()
    with user_errors():
        from homespec.config import GenerationConfig, SamplingConfig

        options = engine_options(model, stages, mode, draft, wave_size, by_score, emulate, time_scale, dtype, device,
                                 max_context, workers, cluster, peer_timeout, weights)  # fmt: skip
        config = GenerationConfig(
            max_tokens=max_tokens, sampling=SamplingConfig(temperature=temperature, top_p=top_p, seed=seed), trace=True
        )
    from tui.app import make_app

    app = make_app(options, config)
    app.run()
    if app.return_code:
        raise typer.Exit(app.return_code)
