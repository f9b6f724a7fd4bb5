"""The ``homespec`` command: each command lives in its own module and is registered here."""

from __future__ import annotations

import typer

from homespec import __version__
from homespec.cli.bench import bench
from homespec.cli.chat import chat
from homespec.cli.generate import generate
from homespec.cli.keys import keys
from homespec.cli.perplexity import perplexity
from homespec.cli.plan import plan
from homespec.cli.prepare import prepare
from homespec.cli.profile import profile
from homespec.cli.quantize import quantize
from homespec.cli.serve import serve
from homespec.cli.train_draft import train_draft
from homespec.cli.worker import worker

app = typer.Typer(
    name="homespec",
    help="Run a language model across the devices you own, with lossless pipelined speculative decoding.",
    no_args_is_help=True,
    add_completion=False,
)
app.command()(generate)
app.command()(chat)
app.command()(prepare)
app.command()(bench)
app.command()(serve)
app.command()(plan)
app.command()(perplexity)
app.command()(quantize)
app.command()(profile)
app.command()(worker)
app.add_typer(keys)
app.command(name="train-draft")(train_draft)


@app.command()
def version() -> None:
    """Print HomeSpec's version."""
    typer.echo(__version__)


if __name__ == "__main__":
    app()
