"""``homespec plan [MODEL] [--profile P]…``: where each layer of MODEL would run, and how fast (DESIGN §6).

Reads the model's ``config.json`` and weight index only (no weights), the profiles given (default: this machine's,
``profiles/<host>.json`` when saved, else measured now), and prints the planner's table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from homespec.cli.common import quiet_libraries, user_errors
from homespec.core.planner import GB, PLAN_MODES, WEIGHT_BYTES, Plan, PlanOptions


def plan(
    model: Annotated[str | None, typer.Argument(help="folder, .gguf or repo id (default: bundled)")] = None,
    profile: Annotated[
        list[Path] | None, typer.Option("--profile", "-p", help="profile JSON (repeat to join several machines)")
    ] = None,
    stages: Annotated[int | None, typer.Option("--stages", "-s", help="exactly this many stages")] = None,
    weights: Annotated[str, typer.Option(help=f"weight format: {' | '.join(WEIGHT_BYTES)}")] = "fp16",
    dtype: Annotated[
        str, typer.Option(help="activations and KV: fp32 | fp16 | bf16 (default: the weights' own, fp16 if quantized)")
    ] = "",
    context: Annotated[int, typer.Option(help="tokens of KV each stage reserves")] = 4096,
    mode: Annotated[str, typer.Option(help="the mode whose time between tokens to minimize")] = "specpipe",
    wave_size: Annotated[
        int, typer.Option("--wave-size", help="specpipe: rows per step (0: the model's, 32 or fewer for MoE)")
    ] = 0,
    hit_rate: Annotated[
        float, typer.Option("--hit-rate", help="the draft's per-depth hit rate (specpipe, tree)")
    ] = 0.6,
    as_json: Annotated[bool, typer.Option("--json", help="print the plan as JSON")] = False,
) -> None:
    """Place MODEL's layers on the profiled devices and print the modeled time of each decoding mode."""
    quiet_libraries()
    with user_errors():
        from homespec.core.planner import default_wave_rows
        from homespec.core.planner import plan as make_plan
        from homespec.model.shape import read_shape

        shape = read_shape(model)
        cluster = cluster_profile(profile or [])
        opts = PlanOptions(
            weights=weights,
            act=dtype,
            context=context,
            mode=mode,
            stages=stages,
            wave_rows=wave_size or default_wave_rows(shape),
            hit_rate=hit_rate,
        )
        result = make_plan(shape, cluster.topology(weights), opts)
        if as_json:
            typer.echo(json.dumps(plan_json(result), indent=2))
        else:
            print_plan(result, cluster.name)


def cluster_profile(paths: list[Path]) -> Any:
    """The profiles named, merged; none: this machine's saved profile, or one measured now."""
    from homespec.profiling.profile import load_profile, merge_profiles

    if paths:
        return merge_profiles([load_profile(p) for p in paths])
    from homespec.profiling.local import saved_or_measured

    return saved_or_measured()


def plan_json(p: Plan) -> dict[str, Any]:
    return {
        "model": p.shape.name,
        "weights": p.options.weights,
        "context": p.options.context,
        "objective": p.options.mode,
        "stages": [
            {
                "host": s.device.host,
                "device": s.device.torch_device,
                "name": s.device.name,
                "layers": list(s.layers),
                "embed": s.embed,
                "head": s.head,
                "weights_gb": round(s.weight_bytes / GB, 3),
                "kv_gb": round(s.kv_bytes / GB, 3),
                "activations_gb": round(s.activation_bytes / GB, 3),
                "free_gb": round(s.device.memory_bytes / GB, 3),
                "step_ms": round(s.step_s * 1e3, 3),
                "wave_step_ms": round(s.wave_step_s * 1e3, 3),
                "link_ms": round(s.link_s * 1e3, 3),
            }
            for s in p.stages
        ],
        "left_out": [{"device": x.device.label, "reason": x.reason} for x in p.left_out],
        "tbt_ms": {m: round(v * 1e3, 2) for m, v in p.tbt_s.items()},
    }


def print_plan(p: Plan, profile_name: str) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    o = p.options
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    rows = {"pp": 1, "tree": o.tree_rows, "specpipe": o.wave_rows}[o.mode]
    table = Table(title=f"{p.shape.name} ({p.shape.params / 1e9:.1f}B parameters, {o.weights}) over {profile_name}")
    for col in ("stage", "host", "device", "layers", "weights GB", "KV GB", "used/free GB"):
        table.add_column(col, justify="right" if "GB" in col or col == "stage" else "left")
    for col in ("step ms", f"{rows} rows ms", "link ms"):
        table.add_column(col, justify="right")
    for i, s in enumerate(p.stages):
        a, b = s.layers
        ends = " embed" * s.embed + " head" * s.head
        table.add_row(
            str(i + 1),
            s.device.host,
            f"{s.device.torch_device} {s.device.name}",
            f"{a}-{b - 1} ({b - a}){ends}",
            f"{s.weight_bytes / GB:.1f}",
            f"{s.kv_bytes / GB:.2f}",
            f"{(s.memory_bytes + o.headroom_bytes) / GB:.1f}/{s.device.memory_bytes / GB:.1f}",
            f"{s.step_s * 1e3:.1f}",
            f"{s.wave_step_s * 1e3:.1f}",
            f"{s.link_s * 1e3:.2f}",
        )
    console.print(table)
    for x in p.left_out:
        console.print(f"left out: {x.device.label}: {x.reason}")
    modes = ", ".join(f"{m} {p.tbt_s[m] * 1e3:.1f} ms ({1 / p.tbt_s[m]:.1f} tokens/s)" for m in PLAN_MODES)
    console.print(f"modeled time between tokens: {modes}")
    best = min(p.tbt_s, key=lambda m: p.tbt_s[m])
    if p.tbt_s[best] < p.tbt_s[o.mode] * 0.95:
        slowest = max(p.stages, key=lambda s: s.wave_step_s + s.link_s)
        console.print(
            f"hint: {best} is modeled faster here; at {rows} rows per step the slowest stage is "
            f"{slowest.device.label} ({slowest.wave_step_s * 1e3:.1f} ms + {slowest.link_s * 1e3:.1f} ms link): "
            f"try --mode {best}, or fewer rows per step (--wave-size)"
        )
    console.print(
        f"(placed to minimize {o.mode} at {rows} rows per step; KV for {o.context} tokens per stage; draft hit rate "
        f"{o.hit_rate} per depth; {o.headroom_bytes / 2**30:.0f} GiB headroom per device)"
    )
