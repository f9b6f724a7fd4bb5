"""This machine's devices: CUDA GPUs (NVML for name, memory and utilization, torch for the rest), Apple MPS, and the
CPU with its RAM (psutil). The libraries are parameters, so the CUDA path is tested without a GPU.

Speeds are not measured here (``microbench.py`` does); every figure here is read from the driver or the OS.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path
from typing import Any

from homespec.profiling.profile import DeviceProfile

log = logging.getLogger(__name__)

GiB = 2**30
#: RAM the CPU device leaves to the OS and the head process (tokenizer, drafts) on top of the planner's headroom.
CPU_RESERVE_BYTES = 2 * GiB


def detect(torch_mod: Any = None, nvml: Any = None, psutil_mod: Any = None) -> list[DeviceProfile]:
    """Every device of this machine, speeds left at 0: GPUs first, then the CPU (left out on a Mac with MPS,
    whose unified memory is the MPS device's)."""
    if torch_mod is None:
        import torch as torch_mod
    if psutil_mod is None:
        import psutil

        psutil_mod = psutil
    out = cuda_devices(torch_mod, nvml if nvml is not None else _nvml())
    mps = mps_device(torch_mod, psutil_mod)
    if mps is not None:
        out.append(mps)
    else:
        out.append(cpu_device(psutil_mod))
    return out


def _nvml() -> Any:
    """The NVML module, initialised, or None when there is no NVIDIA driver (then torch alone is asked)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception as exc:  # ImportError, or NVMLError_LibraryNotFound / DriverNotLoaded: no NVIDIA driver here
        log.debug("NVML unavailable: %s", exc)
        return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def cuda_devices(torch_mod: Any, nvml: Any) -> list[DeviceProfile]:
    """One profile per CUDA device torch sees (``cuda:N`` order), matched to NVML by UUID for the driver's name,
    free memory and utilization; torch's own figures when NVML is absent."""
    if not torch_mod.cuda.is_available():
        return []
    by_uuid: dict[str, Any] = {}
    if nvml is not None:
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            by_uuid[_text(nvml.nvmlDeviceGetUUID(handle)).removeprefix("GPU-")] = handle
    out = []
    for i in range(torch_mod.cuda.device_count()):
        props = torch_mod.cuda.get_device_properties(i)
        uuid = str(getattr(props, "uuid", "")).removeprefix("GPU-")
        handle = by_uuid.get(uuid)
        extra = {
            "compute_capability": f"{props.major}.{props.minor}",
            "multiprocessors": int(props.multi_processor_count),
        }
        if handle is not None:
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            name, total, free = _text(nvml.nvmlDeviceGetName(handle)), float(mem.total), float(mem.free)
            utilization: float | None = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            extra["driver"] = _text(nvml.nvmlSystemGetDriverVersion())
        else:
            free_b, total_b = torch_mod.cuda.mem_get_info(i)
            name, total, free, utilization = str(props.name), float(total_b), float(free_b), None
        out.append(
            DeviceProfile("cuda", i, name, round(total / 1e9, 3), round(free / 1e9, 3), 0.0, {}, utilization, extra)
        )
    return out


def mps_device(torch_mod: Any, psutil_mod: Any) -> DeviceProfile | None:
    backend = getattr(torch_mod.backends, "mps", None)
    if backend is None or not backend.is_available():
        return None
    total = float(psutil_mod.virtual_memory().total)
    usable = float(torch_mod.mps.recommended_max_memory())  # the working set macOS lets the GPU wire
    name = f"Apple {platform.processor() or 'silicon'} GPU"
    return DeviceProfile("mps", 0, name, round(total / 1e9, 3), round(usable / 1e9, 3), 0.0)


def cpu_device(psutil_mod: Any) -> DeviceProfile:
    vm = psutil_mod.virtual_memory()
    free = max(0.0, float(vm.available) - CPU_RESERVE_BYTES)
    extra = {
        "cores": psutil_mod.cpu_count(logical=False) or 0,
        "threads": psutil_mod.cpu_count(logical=True) or 0,
    }
    return DeviceProfile("cpu", 0, cpu_name(), round(vm.total / 1e9, 3), round(free / 1e9, 3), 0.0, {}, None, extra)


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "CPU"
