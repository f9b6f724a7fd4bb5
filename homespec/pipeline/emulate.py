"""Emulating a home cluster on one machine (DESIGN §10): each stage pads its step to the modeled time of its device
for the emulated target, and each link adds its modeled latency and bytes / bandwidth. The math is the real small
model's; only the clock follows the profile.

Profile format (``profiles/*.json``): ``emulated_model`` {layers, hidden_size, bytes_per_param, params_per_layer},
``hosts`` [{name, devices [{name, memory_gb, mem_bw_gb_s, tflops}]}], ``links`` {intra_host, inter_host:
{latency_ms, mb_per_s}}, ``overhead_ms``, ``compute_efficiency``. Stage i runs on the i-th device; the emulated
layers are split in proportion to device memory.

**Time scale.** S stage processes share this machine's cores, and each really computes its layers of the small
model. When S exceeds the cores, their real compute competes for the CPU and the stages fall behind the modeled
clock. The emulator then runs the clock ``time_scale`` times slower (every modeled duration is multiplied by it),
and every reported time is divided by it: the same schedule, measured where the real compute fits inside the
modeled step. Default: ``S / cores`` (at least 1).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from homespec.errors import ConfigError


@dataclass(frozen=True)
class StageTiming:
    device: str
    host: str
    layers: int  # emulated target layers on this stage
    base_ms: float  # weights read once per step: bytes / bandwidth, plus overhead
    ms_per_row: float  # compute per wave row: 2 * params / (FLOP/s * efficiency)
    link_ms: float  # latency of the outgoing link
    link_ms_per_row: float  # hidden-state bytes per row / link bandwidth

    def step_ms(self, rows: int) -> float:
        return max(self.base_ms, self.ms_per_row * rows)

    def send_ms(self, rows: int) -> float:
        return self.link_ms + self.link_ms_per_row * rows


def auto_time_scale(stages: int, cores: int | None = None) -> float:
    """How much slower than real time to run an emulated S-stage cluster on this machine (module docstring)."""
    return max(1.0, stages / (cores or os.cpu_count() or 1))


def load_profile(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"profile not found: {p}", hint="see profiles/ for examples")
    try:
        data: dict[str, Any] = json.loads(p.read_text())
        for key in ("emulated_model", "hosts", "links"):
            data[key]  # presence check: KeyError if missing
    except (json.JSONDecodeError, KeyError) as exc:
        raise ConfigError(f"profile {p} is malformed: {exc}") from exc
    return data


def stage_timings(profile: dict[str, Any], stages: int) -> list[StageTiming]:
    """The modeled timing of each of ``stages`` stages (one per device, in profile order)."""
    devices = [(h["name"], d) for h in profile["hosts"] for d in h["devices"]]
    if not (1 <= stages <= len(devices)):
        raise ConfigError(f"profile {profile.get('name')} has {len(devices)} devices; cannot emulate {stages} stages")
    devices = devices[:stages]
    model = profile["emulated_model"]
    layers = _split(model["layers"], [d["memory_gb"] for _, d in devices])
    eff = float(profile.get("compute_efficiency", 0.5))
    overhead = float(profile.get("overhead_ms", 0.0))
    row_bytes = model["hidden_size"] * model["bytes_per_param"]
    out = []
    for i, ((host, dev), n_layers) in enumerate(zip(devices, layers, strict=True)):
        params = n_layers * model["params_per_layer"]
        base = params * model["bytes_per_param"] / (dev["mem_bw_gb_s"] * 1e9) * 1e3 + overhead
        per_row = 2 * params / (dev["tflops"] * 1e12 * eff) * 1e3
        next_host = devices[i + 1][0] if i + 1 < len(devices) else devices[0][0]  # the last stage answers the head
        link = profile["links"]["intra_host" if next_host == host else "inter_host"]
        out.append(
            StageTiming(
                dev["name"], host, n_layers, base, per_row, link["latency_ms"], row_bytes / (link["mb_per_s"] * 1e3)
            )
        )
    return out


def _split(total: int, weights: list[float]) -> list[int]:
    raw = [total * w / sum(weights) for w in weights]
    out = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - out[i], reverse=True)[: total - sum(out)]:
        out[i] += 1
    return out
