"""``homespec keys``: this machine's CurveZMQ public keys, and which heads its worker trusts (DESIGN §7)."""

from __future__ import annotations

from typing import Annotated

import typer

from homespec.cli.common import user_errors

keys = typer.Typer(
    name="keys",
    help="Show this machine's public keys; trust or untrust a head's key for this machine's worker.",
    invoke_without_command=True,
    no_args_is_help=False,
    add_completion=False,
)


@keys.callback()
def show(ctx: typer.Context) -> None:
    """Print the head's and the worker's public keys (made on first use; the secrets stay in their 0600 files)."""
    if ctx.invoked_subcommand is not None:
        return
    with user_errors():
        from homespec.config import config_dir
        from homespec.transport.keys import load_or_create, trusted_heads

        typer.echo(f"head key:   {load_or_create('head').public}")
        typer.echo(f"worker key: {load_or_create('worker').public}")
        typer.echo(f"(in {config_dir()}; this worker trusts {len(trusted_heads())} head(s))")
        typer.echo("to let a worker serve this head, run there: homespec keys trust <head key>")


@keys.command()
def trust(
    key: Annotated[str, typer.Argument(help="a head's public key (homespec keys, on the head)")],
    name: Annotated[str, typer.Option(help="a name to remember it by")] = "",
) -> None:
    """Let this machine's worker serve the head with KEY."""
    with user_errors():
        from homespec.transport.keys import trust as add

        typer.echo("trusted" if add(key, name) else "already trusted")


@keys.command()
def untrust(key: Annotated[str, typer.Argument(help="a trusted head's public key")]) -> None:
    """Stop serving the head with KEY (its next connection is refused)."""
    with user_errors():
        from homespec.transport.keys import untrust as remove

        typer.echo("removed" if remove(key) else "was not trusted")


@keys.command(name="list")
def list_trusted() -> None:
    """The heads this machine's worker serves."""
    with user_errors():
        from homespec.transport.keys import trusted_heads

        for key, name in trusted_heads().items():
            typer.echo(f"{key} {name}".rstrip())
