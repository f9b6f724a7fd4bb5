"""``homespec keys``: this machine's CurveZMQ public keys, and which heads its worker trusts (DESIGN §7)."""

from __future__ import annotations

import shlex
from typing import Annotated

import typer

from homespec.cli.common import user_errors

keys = typer.Typer(
    name="keys",
    help="Show this machine's public keys; trust or untrust a head (for this machine's worker) or a worker (for "
    "this machine's head).",
    invoke_without_command=True,
    no_args_is_help=False,
    add_completion=False,
)


@keys.callback()
def show(ctx: typer.Context) -> None:
    """Print the head's and the worker's public keys and fingerprints (made on first use; the secrets stay in their
    0600 files)."""
    if ctx.invoked_subcommand is not None:
        return
    with user_errors():
        from homespec.config import config_dir
        from homespec.transport.keys import fingerprint, load_or_create, trusted_heads, trusted_workers

        head, worker = load_or_create("head").public, load_or_create("worker").public
        typer.echo(f"head key:   {head}  (fingerprint {fingerprint(head)})")
        typer.echo(f"worker key: {worker}  (fingerprint {fingerprint(worker)})")
        typer.echo(
            f"(in {config_dir()}; this worker trusts {len(trusted_heads())} head(s), this head "
            f"{len(trusted_workers())} worker(s))"
        )
        typer.echo(f"to let a worker serve this head, run there: homespec keys trust -- {shlex.quote(head)}")
        typer.echo("to let this head use a worker: homespec keys trust-worker -- '<worker key>'")


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


@keys.command(name="trust-worker")
def trust_worker(
    key: Annotated[str, typer.Argument(help="a worker's public key (printed by `homespec worker` there)")],
    name: Annotated[str, typer.Option(help="a name to remember it by")] = "",
) -> None:
    """Let this machine's head deploy stages (and so the prompt and the output) to the worker with KEY. Compare the
    fingerprint printed here with the one `homespec worker` printed on that machine."""
    with user_errors():
        from homespec.transport.keys import TRUSTED_WORKERS, fingerprint
        from homespec.transport.keys import trust as add

        added = add(key, name, list_name=TRUSTED_WORKERS)
        typer.echo(f"{'trusted' if added else 'already trusted'}: worker fingerprint {fingerprint(key)}")


@keys.command(name="untrust-worker")
def untrust_worker(key: Annotated[str, typer.Argument(help="a trusted worker's public key")]) -> None:
    """Stop deploying to the worker with KEY."""
    with user_errors():
        from homespec.transport.keys import TRUSTED_WORKERS
        from homespec.transport.keys import untrust as remove

        typer.echo("removed" if remove(key, list_name=TRUSTED_WORKERS) else "was not trusted")


@keys.command(name="list")
def list_trusted() -> None:
    """The heads this machine's worker serves, and the workers this machine's head deploys to."""
    with user_errors():
        from homespec.transport.keys import fingerprint, trusted_heads, trusted_workers

        for role, known in (("head", trusted_heads()), ("worker", trusted_workers())):
            for key, name in known.items():
                typer.echo(f"{role:6} {key} {fingerprint(key)} {name}".rstrip())
