"""``homespec serve [MODEL]``: the local OpenAI-compatible server (DESIGN §8)."""

from __future__ import annotations

from dataclasses import replace
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
from homespec.config import DEFAULT_READ_TIMEOUT_S
from homespec.core.step import DEFAULT_BY_SCORE
from homespec.errors import ConfigError


def serve(
    model: Annotated[str | None, typer.Argument(help="a folder, .gguf or repo id (default: the bundled model)")] = None,
    host: Annotated[str, typer.Option(help="address to bind (127.0.0.1: this machine only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar="HOMESPEC_API_KEY", help="require 'Authorization: Bearer KEY'")
    ] = None,
    served_name: Annotated[str | None, typer.Option("--served-name", help="model id clients use")] = None,
    stages: StagesOption = 1,
    mode: ModeOption = None,
    draft: Annotated[str, typer.Option(help="draft source")] = DEFAULT_DRAFT,
    wave_size: WaveSizeOption = 0,
    by_score: ByScoreOption = DEFAULT_BY_SCORE,
    emulate: EmulateOption = None,
    time_scale: TimeScaleOption = 0.0,
    max_concurrency: Annotated[
        int, typer.Option("--max-concurrency", help="requests sharing the pipeline's steps (ar: 1)")
    ] = 4,
    max_queue: Annotated[int, typer.Option("--max-queue", help="waiting requests before 429")] = 32,
    max_connections: Annotated[
        int, typer.Option("--max-connections", help="HTTP connections open at once (past it: 503 at once)")
    ] = 256,
    read_timeout: Annotated[
        float, typer.Option("--read-timeout", help="seconds a client has to send a request's head, then its body")
    ] = DEFAULT_READ_TIMEOUT_S,
    dtype: DtypeOption = "fp32",
    weights: WeightsOption = "auto",
    device: DeviceOption = "cpu",
    max_context: MaxContextOption = 4096,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn's log level")] = "warning",
    workers: WorkersOption = None,
    cluster: ClusterOption = None,
    peer_timeout: PeerTimeoutOption = 10.0,
) -> None:
    """Serve the model with an OpenAI-compatible API (``/v1/chat/completions``, ``/v1/completions``)."""
    quiet_libraries()
    with user_errors():
        if not (1 <= port <= 65535):
            raise ConfigError(f"--port must be in [1, 65535], got {port}")
        if not (1 <= max_concurrency <= 256):
            raise ConfigError(f"--max-concurrency must be in [1, 256], got {max_concurrency}")
        if not (1 <= max_queue <= 10_000):
            raise ConfigError(f"--max-queue must be in [1, 10000], got {max_queue}")
        if not (4 <= max_connections <= 100_000):
            raise ConfigError(f"--max-connections must be in [4, 100000], got {max_connections}")
        if not (0.5 <= read_timeout <= 3600):
            raise ConfigError(f"--read-timeout must be in [0.5, 3600] seconds, got {read_timeout}")
        import uvicorn

        from homespec.engine import Engine
        from homespec.model.loader import model_id
        from homespec.server.app import ServerOptions, create_app
        from homespec.server.guard import timed_h11
        from homespec.server.metrics import Metrics
        from homespec.server.service import GenerationService

        options = engine_options(model, stages, mode, draft, wave_size, by_score, emulate, time_scale, dtype, device,
                                 max_context, workers, cluster, peer_timeout, weights)  # fmt: skip
        where = "remote workers" if options.remote else f"{stages} stage(s)"
        typer.echo(f"loading {model or 'the bundled model'} ({options.mode}, {where})…", err=True)
        name = served_name or model_id(model)
        metrics = Metrics(name)
        options = replace(options, max_concurrency=max_concurrency)  # each stage holds that many requests' KV
        said: set[str] = set()

        def build() -> Engine:
            engine = Engine(options)
            if engine.notice and engine.notice not in said:  # what --weights auto chose, once (not per rebuild)
                said.add(engine.notice)
                typer.echo(engine.notice, err=True)
            return engine

        service = GenerationService(build, metrics, max_concurrency, max_queue)
        tokenizer = service.fresh_tokenizer()
        app = create_app(service, tokenizer, ServerOptions(name, max_context, api_key, read_timeout_s=read_timeout))
        service.start()
        typer.echo(f"serving {name!r} at http://{host}:{port}/v1 (ctrl+c stops)", err=True)
        try:
            uvicorn.run(
                app, host=host, port=port, log_level=log_level, http=timed_h11(read_timeout),
                limit_concurrency=max_connections,
            )  # fmt: skip
        finally:
            service.close()
