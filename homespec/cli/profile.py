"""``homespec profile [--lan] [--peer HOST:PORT]… [--save] [--json]``: measure this machine (and the workers on the
LAN, and the links to them) and print or save the profile the planner reads (DESIGN §6, ``profiles/README.md``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from homespec.cli.common import quiet_libraries, user_errors


def profile(
    lan: Annotated[
        bool, typer.Option("--lan", help="also find workers on the LAN (zeroconf) and measure them")
    ] = False,
    peer: Annotated[
        list[str] | None, typer.Option("--peer", help="a worker's HOST:PORT (where multicast does not reach)")
    ] = None,
    save: Annotated[bool, typer.Option("--save", help="write profiles/<name>.json")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="write the profile to this file")] = None,
    name: Annotated[str | None, typer.Option(help="this host's name in the profile (default: the hostname)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the profile as JSON")] = False,
    budget: Annotated[float, typer.Option(help="seconds per micro-benchmark")] = 0.6,
    browse: Annotated[float, typer.Option(help="seconds to listen for workers with --lan")] = 3.0,
) -> None:
    """Detect and measure devices (memory, matmul TFLOP/s per dtype, memory bandwidth) and links."""
    quiet_libraries()
    with user_errors():
        from homespec.profiling.local import measure_host, saved_path, this_machine
        from homespec.profiling.local import save as save_profile

        def say(text: str) -> None:
            if not as_json:
                typer.echo(text, err=True)

        cluster = this_machine(measure_host(name, budget_s=budget, progress=say))
        if lan or peer:
            from homespec.profiling.lan import add_workers
            from homespec.transport.keys import fingerprint

            cluster, untrusted = add_workers(
                cluster, browse_s=browse if lan else 0.0, peers=peer or [], progress=say, confirm=_ask_if_terminal()
            )
            for p, key in untrusted:
                typer.echo(
                    f"untrusted, not used: worker {p.name} at {p.address}:{p.port}, key {key} "
                    f"(fingerprint {fingerprint(key)})",
                    err=True,
                )
            if untrusted:
                typer.echo(
                    "if a fingerprint is the one `homespec worker` printed on that machine: homespec keys "
                    "trust-worker -- 'KEY', then measure again",
                    err=True,
                )
        if save or out:
            path = save_profile(cluster, out or saved_path(cluster.name))
            say(f"saved {path}")
        if as_json:
            typer.echo(json.dumps(cluster.to_json(), indent=2))
        else:
            print_profile(cluster)


def _ask_if_terminal() -> Any:
    """At a terminal, ask the user about each untrusted worker (compare the fingerprint with the worker's own);
    elsewhere nothing is trusted without ``homespec keys trust-worker``."""
    import sys

    if not sys.stdin.isatty():
        return None

    def confirm(peer: Any, key: str) -> bool:
        from homespec.transport.keys import fingerprint

        return bool(
            typer.confirm(
                f"worker {peer.name} at {peer.address}:{peer.port} has key fingerprint {fingerprint(key)}; is that "
                "the fingerprint `homespec worker` printed there? Trust it",
                default=False,
                err=True,
            )
        )

    return confirm


def print_profile(cluster: Any) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    table = Table(title=f"profile {cluster.name}")
    for col in ("host", "device", "name", "memory GB (free)", "GB/s", "fp32", "fp16", "bf16 TFLOP/s", "busy %"):
        table.add_column(col, justify="left" if col in ("host", "device", "name") else "right")
    for h in cluster.hosts:
        for d in h.devices:
            where = f"cuda:{d.index}" if d.kind == "cuda" else d.kind
            flops = [f"{d.tflops[k]:.3g}" if k in d.tflops else "-" for k in ("fp32", "fp16", "bf16")]
            busy = "-" if d.utilization is None else f"{d.utilization:.0f}"
            memory = f"{d.memory_gb:.1f} ({d.memory_free_gb:.1f})"
            table.add_row(h.name, where, d.name, memory, f"{d.mem_bw_gb_s:.1f}", *flops, busy)
    console.print(table)
    for x in cluster.links:
        console.print(
            f"link {x.a} <-> {x.b}: {x.latency_ms:.2f} ms one way (p90 {x.latency_p90_ms:.2f}), {x.mb_per_s:.1f} MB/s"
        )
