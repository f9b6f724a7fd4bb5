"""Emulating a home cluster on one machine (DESIGN §10): each stage pads its step to the modeled time of its device
for the emulated target, and each link adds its modeled latency and bytes / bandwidth. The math is the real small
model's; only the clock follows the profile.

The profile is read by ``profiling/profile.py`` (the one profile reader; format in ``profiles/README.md``): an
emulation profile adds ``emulated_model`` {layers, hidden_size, bytes_per_param, params_per_layer}, ``overhead_ms``
and ``compute_efficiency``. Stage i runs on the i-th device; the emulated layers are split in proportion to device
memory. A stage's step follows the planner's time model (``core/planner.py`` ``StageTime``: max(weight bytes /
bandwidth, rows · 2 · params / (FLOP/s · efficiency)) + overhead), a link's its ``Link``: latency + bytes / bandwidth.

**Time scale.** S stage processes share this machine's cores, and each really computes its layers of the small
model. When S exceeds the cores, their real compute competes for the CPU and the stages fall behind the modeled
clock. The emulator then runs the clock ``time_scale`` times slower (every modeled duration is multiplied by it),
and every reported time is divided by it: the same schedule, measured where the real compute fits inside the
modeled step. Default: ``S / cores`` (at least 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from homespec.core.planner import StageTime, stage_time
from homespec.errors import ConfigError
from homespec.profiling.profile import ClusterProfile


@dataclass(frozen=True)
class StageTiming:
    device: str
    host: str
    layers: int  # emulated target layers on this stage
    time: StageTime  # the planner's step model of those layers on this device
    link_ms: float  # latency of the outgoing link
    link_ms_per_row: float  # hidden-state bytes per row / link bandwidth

    def step_ms(self, rows: int) -> float:
        return self.time.seconds(rows) * 1e3

    def send_ms(self, rows: int) -> float:
        return self.link_ms + self.link_ms_per_row * rows


def auto_time_scale(stages: int, cores: int | None = None) -> float:
    """How much slower than real time to run an emulated S-stage cluster on this machine (module docstring)."""
    return max(1.0, stages / (cores or os.cpu_count() or 1))


def stage_timings(profile: ClusterProfile, stages: int) -> list[StageTiming]:
    """The modeled timing of each of ``stages`` stages (one per device, in profile order)."""
    model = profile.emulated
    if model is None:
        raise ConfigError(
            f"profile {profile.name} names no emulated_model, so it cannot be emulated",
            hint="--emulate takes a profile written for emulation (profiles/README.md), e.g. "
            "profiles/home-8x3090-1gbe.json",
        )
    topo = profile.topology("fp32" if model.bytes_per_param >= 4 else "fp16")
    if not (1 <= stages <= len(topo.devices)):
        raise ConfigError(f"profile {profile.name} has {len(topo.devices)} devices; cannot emulate {stages} stages")
    devices = topo.devices[:stages]
    layers = _split(model.layers, [d.memory_bytes for d in devices])
    row_bytes = model.hidden_size * model.bytes_per_param
    out = []
    for i, (dev, n_layers) in enumerate(zip(devices, layers, strict=True)):
        params = n_layers * model.params_per_layer
        time = stage_time(
            params, params * model.bytes_per_param, dev, profile.compute_efficiency, profile.overhead_ms / 1e3
        )
        next_host = devices[i + 1].host if i + 1 < len(devices) else devices[0].host  # the last answers the head
        link = topo.link(dev.host, next_host)
        out.append(
            StageTiming(dev.name, dev.host, n_layers, time, link.latency_s * 1e3, row_bytes / link.bytes_per_s * 1e3)
        )
    return out


def _split(total: int, weights: list[float]) -> list[int]:
    raw = [total * w / sum(weights) for w in weights]
    out = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - out[i], reverse=True)[: total - sum(out)]:
        out[i] += 1
    return out
