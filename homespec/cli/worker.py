"""``homespec worker``: serve this machine's devices to a trusted head over CurveZMQ (pipeline/daemon.py)."""

from __future__ import annotations

import shlex
from typing import Annotated

import typer

from homespec.cli.common import quiet_libraries, user_errors
from homespec.errors import ConfigError


def worker(
    port: Annotated[int, typer.Option(help="control port; info is port + 1, stage inputs port + 2 …")] = 7650,
    name: Annotated[str | None, typer.Option(help="this worker's name (default: the hostname)")] = None,
    devices: Annotated[str | None, typer.Option(help="devices to serve, e.g. cuda:0,cuda:1 (default: all)")] = None,
    host: Annotated[str, typer.Option(help="address to bind")] = "0.0.0.0",
    head_timeout: Annotated[
        float, typer.Option("--head-timeout", help="seconds of head silence that end a session")
    ] = (10.0),
    advertise: Annotated[bool, typer.Option("--advertise/--no-advertise", help="zeroconf advert on the LAN")] = True,
    bench_budget: Annotated[float, typer.Option("--bench-budget", help="seconds per micro-benchmark")] = 0.4,
) -> None:
    """Wait for a trusted head and run the pipeline stages it assigns to this machine."""
    quiet_libraries()
    with user_errors():
        if not (1 <= port <= 65535 - 16):
            raise ConfigError(f"--port must be in [1, {65535 - 16}], got {port}")
        if not (1.0 <= head_timeout <= 3600):
            raise ConfigError(f"--head-timeout must be in [1, 3600] seconds, got {head_timeout}")
        from homespec.pipeline.daemon import WorkerDaemon
        from homespec.transport.keys import fingerprint, trusted_heads

        wanted = [d.strip() for d in devices.split(",") if d.strip()] if devices else None
        daemon = WorkerDaemon(port, name, wanted, host, head_timeout, advertise, bench_budget)
        trusted = len(trusted_heads())
        typer.echo(f"worker {daemon.name} on {host}:{port}, devices {', '.join(daemon.devices)}", err=True)
        typer.echo(f"worker key: {daemon.keys.public}  (fingerprint {fingerprint(daemon.keys.public)})", err=True)
        typer.echo(
            f"a head uses this worker once told: homespec keys trust-worker -- {shlex.quote(daemon.keys.public)}",
            err=True,
        )
        if trusted:
            typer.echo(f"trusts {trusted} head(s); waiting for one (ctrl+c stops)", err=True)
        else:
            typer.echo("trusts no head yet: run `homespec keys trust <head key>` here (no restart needed)", err=True)
        daemon.run()
