"""What every command shares: turning HomespecError into a one-line message and an exit code, and the options
that several commands take."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from homespec.errors import HomespecError

if TYPE_CHECKING:
    from homespec.engine import EngineOptions

T = TypeVar("T")

DEFAULT_DRAFT = "auto"  # measured: BENCHMARKS.md §1, §2

WaveSizeOption = Annotated[
    int, typer.Option("--wave-size", help="specpipe: nodes injected per step (0: the model's, 32 or fewer for MoE)")
]
ByScoreOption = Annotated[
    bool, typer.Option("--by-score/--by-depth", help="specpipe: FlowSpec score order, or SpecPipe depth layers")
]
TimeScaleOption = Annotated[float, typer.Option("--time-scale", help="emulation: clock slow-down (0 = auto)")]
StagesOption = Annotated[int, typer.Option("--stages", "-s", help="stage processes (1: the whole model here)")]
ModeOption = Annotated[str | None, typer.Option(help="ar | pp | tree | specpipe (default: by --stages)")]
EmulateOption = Annotated[str | None, typer.Option(help="emulate a cluster profile (profiles/*.json)")]
DtypeOption = Annotated[str, typer.Option(help="fp32 | fp16 | bf16")]
WeightsOption = Annotated[
    str,
    typer.Option(help="weights: auto | fp32 | fp16 | bf16 | int8 | int4 (int4 on a GGUF: its own 4-bit blocks)"),
]
DeviceOption = Annotated[str, typer.Option(help="cpu | cuda:N | mps")]
MaxContextOption = Annotated[int, typer.Option("--max-context")]
WorkersOption = Annotated[
    str | None,
    typer.Option(help="run the stages on these workers: HOST:PORT,… (homespec worker), or 'auto' to find them"),
]
PeerTimeoutOption = Annotated[
    float, typer.Option("--peer-timeout", help="seconds of silence after which a stage or worker is lost")
]
ClusterOption = Annotated[
    str | None, typer.Option(help="run the stages on the workers of this profile (homespec profile --lan --save)")
]


def parse_workers(workers: str | None) -> tuple[str, ...]:
    """``--workers`` as HOST:PORT items (or ``("auto",)``)."""
    return tuple(w.strip() for w in (workers or "").split(",") if w.strip())


def engine_options(
    model: str | None, stages: int, mode: str | None, draft: str, wave_size: int, by_score: bool,
    emulate: str | None, time_scale: float, dtype: str, device: str, max_context: int,
    workers: str | None = None, cluster: str | None = None, peer_timeout: float = 10.0, weights: str = "auto",
) -> EngineOptions:  # fmt: skip
    """The engine the options of ``chat``, ``serve`` and ``generate`` describe. The mode defaults to ``specpipe``
    when the stages are several or remote (``--workers``, ``--cluster``), else ``ar``."""
    from homespec.engine import EngineOptions

    remote = parse_workers(workers)
    pipelined = stages > 1 or bool(remote or cluster)
    return EngineOptions(
        model=model, draft=draft, mode=(mode or ("specpipe" if pipelined else "ar")),  # type: ignore[arg-type]
        stages=stages, wave_size=wave_size, by_score=by_score, emulate=emulate, time_scale=time_scale, dtype=dtype,
        device=device, max_context=max_context, workers=remote, cluster=cluster, peer_timeout_s=peer_timeout,
        weights=weights,
    )  # fmt: skip


def quiet_libraries() -> None:
    """Keep third-party progress bars and advisory warnings off the user's terminal."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=os.environ.get("HOMESPEC_LOG", "WARNING").upper(), format="%(levelname)s %(message)s")


def keep_freed_memory() -> None:
    """Let glibc keep freed memory for reuse instead of handing blocks over 128 KiB back to the kernel at every
    free: a big tensor made per step (a batch's logits) otherwise page-faults its whole size in again each time.
    Measured here: train-draft's data 579 -> 857 rows/s (BENCHMARKS.md §3); the price is a resident size that stays
    at its peak. A no-op where the C library is not glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt's parameter numbers (malloc.h)
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 31)


@contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except HomespecError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        if exc.hint:
            typer.echo(f"hint: {exc.hint}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
