"""This machine as a profile: its devices (``devices.py``) with their measured speeds (``microbench.py``), saved to
and read from ``profiles/<host>.json``."""

from __future__ import annotations

import datetime
import json
import platform
import socket
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from homespec.profiling.profile import ClusterProfile, HostProfile, load_profile, parse_profile

PROFILES_DIR = Path("profiles")


def host_name() -> str:
    return socket.gethostname().split(".")[0] or "localhost"


def measure_host(
    name: str | None = None, budget_s: float = 0.6, progress: Callable[[str], None] | None = None, torch_mod: Any = None
) -> HostProfile:
    """Detect this machine's devices and measure each one (about ``4 × budget_s`` seconds per device)."""
    if torch_mod is None:
        import torch as torch_mod
    from homespec.profiling.devices import detect
    from homespec.profiling.microbench import measure

    say = progress or (lambda text: None)
    threads = torch_mod.get_num_threads()
    devices = []
    for d in detect(torch_mod):
        where = f"cuda:{d.index}" if d.kind == "cuda" else d.kind
        say(f"measuring {where} ({d.name})…")
        figures = measure(torch_mod, where, budget_s=budget_s)
        extra = {**d.extra, "torch_threads": threads} if d.kind == "cpu" else d.extra
        devices.append(replace(d, mem_bw_gb_s=figures["mem_bw_gb_s"], tflops=figures["tflops"], extra=extra))
    return HostProfile(name or host_name(), tuple(devices), os=f"{platform.system()} {platform.release()}")


def this_machine(host: HostProfile) -> ClusterProfile:
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return ClusterProfile(host.name, (host,), head=host.name, measured_at=now)


def saved_path(name: str | None = None) -> Path:
    return PROFILES_DIR / f"{name or host_name()}.json"


def save(profile: ClusterProfile, path: Path | None = None) -> Path:
    target = path or saved_path(profile.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(profile.to_json(), indent=2) + "\n")
    return target


def saved_or_measured() -> ClusterProfile:
    """This machine's saved profile (``profiles/<host>.json``), else one measured now."""
    path = saved_path()
    if path.is_file():
        return load_profile(path)
    return parse_profile(this_machine(measure_host()).to_json())
