"""Where a model's layers run, behind one interface (``Backend``): the engine asks a backend for a decoder per mode
and for what to tell the user about its stages; it never needs to know which kind it has.

- ``InProcessBackend``: the whole target in this process (mode ``ar``; ``split`` in-process stages for tests of
  stage equivalence).
- ``ClusterBackend``: stage processes, started here (``local_backend``; ``--emulate`` pads them to a profile's
  modeled clock) or on ``homespec worker`` processes placed by the planner (``remote_backend``). Its pipelined
  decoders share the stages; mode ``ar`` runs the whole target in this process beside them.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from homespec.config import SamplingConfig, TreeConfig
from homespec.core.planner import even_split
from homespec.core.step import DEFAULT_MAX_TREE, DecodeStep, Draft
from homespec.errors import ConfigError, RequestFailedError
from homespec.events import StageInfo

if TYPE_CHECKING:
    from homespec.core.planner import Plan
    from homespec.engine import EngineOptions
    from homespec.model.loader import ModelSource
    from homespec.pipeline.cluster import Cluster
    from homespec.pipeline.emulate import StageTiming

Progress = Callable[[str], None]
PIPELINED_MODES = ("pp", "tree", "specpipe")


class Decoder(Protocol):
    """Decodes requests over a backend's stages (``pipeline/inprocess.py``, ``pipeline/coordinator.py``)."""

    @property
    def open_requests(self) -> int: ...

    @property
    def busy_fraction(self) -> Sequence[float]: ...

    def decode(
        self,
        prompt: Sequence[int],
        draft: Draft,
        sampling: SamplingConfig,
        tree_cfg: TreeConfig,
        trace: bool = False,
        max_new: int | None = None,
    ) -> Generator[DecodeStep, None, None]: ...

    def join(
        self,
        prompt: Sequence[int],
        draft: Draft,
        sampling: SamplingConfig,
        tree_cfg: TreeConfig,
        trace: bool = False,
        max_new: int | None = None,
    ) -> int: ...

    def step(self) -> list[tuple[int, DecodeStep | RequestFailedError]]: ...

    def leave(self, req: int, stats: bool = False) -> None: ...


class Backend(Protocol):
    def decoder(self, mode: str) -> Decoder:
        """The decoder of ``mode`` (built on first use); ConfigError when this backend cannot run it."""
        ...

    def stage_info(self) -> list[StageInfo]:
        """What each stage is (the TUI's stage pane): its device, layers and outgoing link."""
        ...

    def stage_count(self, mode: str) -> int:
        """Stages a request of ``mode`` runs on."""
        ...

    def clock_scale(self, mode: str) -> float:
        """Real seconds per reported second for ``mode`` (the emulation's time scale; 1 otherwise)."""
        ...

    def modeled_step_ms(self, rows: int = 1) -> float:
        """Emulated runs: the modeled time of one pipeline step (the slowest stage plus its link); 0 otherwise."""
        ...

    def outdated(self) -> bool:
        """The backend could be better now (a missing worker answers again): rebuild between requests."""
        ...

    def weight_bytes(self, mode: str) -> tuple[int, ...]:
        """The bytes of weights each stage of ``mode`` holds."""
        ...

    @property
    def open_requests(self) -> int:
        """Requests whose KV is held right now, by any of its decoders."""
        ...

    def close(self) -> None: ...


def in_process_decoder(source: ModelSource, options: EngineOptions, split: int) -> Decoder:
    """The whole target in this process, as ``split`` in-process stages."""
    from homespec.model.eagle import tap_weights
    from homespec.model.stage import Stage, parse_dtype
    from homespec.pipeline.inprocess import InProcessDecoder

    total = source.num_layers
    if not (1 <= split <= total):
        raise ConfigError(f"split must be in [1, {total}], got {split}")
    dtype = parse_dtype(options.dtype)
    stages = []
    for a, b in even_split(total, split):
        taps = tap_weights(options.taps, source.config, a, b) if options.taps else None
        stages.append(Stage(source, a, b, dtype=dtype, device=options.device, weights=options.weights, taps=taps))
    return InProcessDecoder(stages, max_context=options.max_context)


class InProcessBackend:
    def __init__(self, source: ModelSource, options: EngineOptions) -> None:
        self.source, self.options = source, options
        self._decoder = in_process_decoder(source, options, options.split)

    def decoder(self, mode: str) -> Decoder:
        if mode != "ar":
            raise ConfigError(f"mode {mode!r} needs an engine built for it", hint="make another Engine")
        return self._decoder

    def stage_info(self) -> list[StageInfo]:
        spans = even_split(self.source.num_layers, self.options.split)
        return [StageInfo(f"{self.options.device} (this process)", (a, b)) for a, b in spans]

    def stage_count(self, mode: str) -> int:
        return self.options.split

    def clock_scale(self, mode: str) -> float:
        return 1.0

    def modeled_step_ms(self, rows: int = 1) -> float:
        return 0.0

    def outdated(self) -> bool:
        return False

    def weight_bytes(self, mode: str) -> tuple[int, ...]:
        return tuple(s.weight_bytes for s in self._decoder.stages)  # type: ignore[attr-defined]

    @property
    def open_requests(self) -> int:
        return self._decoder.open_requests

    def close(self) -> None:
        pass


class ClusterBackend:
    """Stage processes (local or on workers) and the decoders that share them."""

    def __init__(
        self,
        source: ModelSource,
        options: EngineOptions,
        cluster: Cluster,
        info: list[StageInfo],
        timings: Sequence[StageTiming] = (),
        time_scale: float = 1.0,
        plan: Plan | None = None,
    ) -> None:
        self.source, self.options, self.cluster = source, options, cluster
        self.info, self.timings, self.time_scale, self.plan = info, tuple(timings), time_scale, plan
        self._decoders: dict[str, Decoder] = {}

    def decoder(self, mode: str) -> Decoder:
        if mode not in self._decoders:
            if mode == "ar":
                self._decoders[mode] = in_process_decoder(self.source, self.options, 1)
            elif mode in PIPELINED_MODES:
                from homespec.pipeline.coordinator import PipelineDecoder

                o = self.options
                self._decoders[mode] = PipelineDecoder(self.cluster, mode, o.wave_size, o.by_score)  # type: ignore[arg-type]
            else:
                raise ConfigError(f"mode {mode!r} is not available here", hint=f"use ar or {PIPELINED_MODES}")
        return self._decoders[mode]

    def stage_info(self) -> list[StageInfo]:
        return list(self.info)

    def stage_count(self, mode: str) -> int:
        return 1 if mode == "ar" else self.cluster.size

    def clock_scale(self, mode: str) -> float:
        return 1.0 if mode == "ar" else self.time_scale

    def modeled_step_ms(self, rows: int = 1) -> float:
        return max((t.step_ms(rows) + t.send_ms(rows) for t in self.timings), default=0.0)

    def outdated(self) -> bool:
        return self.cluster.outdated()

    def weight_bytes(self, mode: str) -> tuple[int, ...]:
        if mode == "ar":
            stages = self.decoder("ar").stages  # type: ignore[attr-defined]
            return tuple(s.weight_bytes for s in stages)
        return tuple(self.cluster.weight_bytes)

    @property
    def open_requests(self) -> int:
        return sum(d.open_requests for d in self._decoders.values())

    def close(self) -> None:
        self.cluster.close()


def eagle3_head(draft: str, source: ModelSource) -> str:
    """The EAGLE-3 head named in a draft spec (``eagle:PATH``, alone or in a mix), or the one shipped for the target
    that ``eagle`` and ``auto`` draft with, whose fc the stages add up as they run (model/eagle.py): a resolved path,
    a hub repo id as given, or ``shipped:NAME`` (each machine reads its own copy); "" when there is none."""
    from homespec.model.drafts import shipped_eagle
    from homespec.model.eagle import SHIPPED, eagle_version

    for part in draft.split("+"):
        kind, _, arg = part.strip().partition(":")
        if kind in ("auto", "eagle") and not arg:
            shipped = shipped_eagle(source, required=kind == "eagle")
            if shipped:
                return shipped
        elif kind == "eagle" and (arg.startswith(SHIPPED) or eagle_version(arg, source.config) == 3):
            local = Path(arg).expanduser()
            return str(local.resolve()) if local.exists() else arg  # a hub repo id: each stage fetches it
    return ""


def build_backend(source: ModelSource, options: EngineOptions, progress: Progress) -> Backend:
    """The backend ``options`` ask for: in process for ``ar``, else stage processes here or on workers."""
    if options.mode == "ar":
        return InProcessBackend(source, options)
    total = source.num_layers
    if not options.remote and not (1 <= options.stages <= total):
        raise ConfigError(f"--stages must be in [1, {total}] for a {total}-layer model, got {options.stages}")
    progress("connecting to the workers…" if options.remote else f"starting {options.stages} stage processes…")
    return remote_backend(source, options, progress) if options.remote else local_backend(source, options, progress)


def local_backend(source: ModelSource, options: EngineOptions, progress: Progress) -> ClusterBackend:
    """``options.stages`` stage processes on this machine, padded to a profile's modeled clock with ``emulate``."""
    from homespec.core.messages import Assign
    from homespec.pipeline.cluster import LocalCluster

    timings: list[StageTiming] = []
    scale = 1.0
    if options.emulate:
        from homespec.pipeline.emulate import auto_time_scale, stage_timings
        from homespec.profiling.profile import load_profile

        timings = stage_timings(load_profile(options.emulate), options.stages)
        scale = options.time_scale or auto_time_scale(options.stages)
    model = "" if options.model is None else str(source.gguf or source.folder)
    assigns = []
    for i, (a, b) in enumerate(even_split(source.num_layers, options.stages)):
        t = timings[i] if timings else None
        assigns.append(
            Assign(
                stage=i,
                num_stages=options.stages,
                model=model,
                layer_start=a,
                layer_end=b,
                dtype=options.dtype,
                device=options.device,
                max_context=options.max_context,
                max_tree=DEFAULT_MAX_TREE,
                emu_base_ms=t.time.read_s * 1e3 * scale if t else 0.0,
                emu_ms_per_row=t.time.row_s * 1e3 * scale if t else 0.0,
                emu_overhead_ms=t.time.overhead_s * 1e3 * scale if t else 0.0,
                emu_link_ms=t.link_ms * scale if t else 0.0,
                emu_link_ms_per_row=t.link_ms_per_row * scale if t else 0.0,
                max_requests=options.max_concurrency,
                weights=options.weights,
                taps=options.taps,
            )
        )
    cluster = LocalCluster(assigns, progress, options.peer_timeout_s)
    info = []
    for i, assign in enumerate(assigns):
        t = timings[i] if timings else None
        device = f"{t.device} @ {t.host}" if t else assign.device
        span = (assign.layer_start, assign.layer_end)
        info.append(StageInfo(device, span, t.link_ms if t else 0.0, assign.device if t else ""))
    return ClusterBackend(source, options, cluster, info, timings, scale)


def remote_backend(source: ModelSource, options: EngineOptions, progress: Progress) -> ClusterBackend:
    """Stages on ``homespec worker`` processes (pipeline/remote.py), placed by the planner; ``--stages`` other
    than 1 asks for exactly that many."""
    from pathlib import Path

    from homespec.model.shape import read_shape
    from homespec.pipeline import remote

    spec = options.model or ""
    model = str(Path(spec).expanduser().resolve()) if spec and Path(spec).expanduser().exists() else spec
    where = remote.RemoteSpec(options.workers, options.cluster, options.stages if options.stages > 1 else None)
    shape = read_shape(str(source.folder))
    cluster, plan = remote.build(
        where, model, shape, options.dtype, options.mode, options.max_context, progress,
        source.digest(options.weights), options.peer_timeout_s, options.max_concurrency, options.weights,
        options.taps,
    )  # fmt: skip
    info = [
        StageInfo(f"{s.device.torch_device} {s.device.name} @ {s.device.host}", s.layers, s.link_s * 1e3)
        for s in plan.stages
    ]
    return ClusterBackend(source, options, cluster, info, plan=plan)
