"""Short micro-benchmarks of one device: matmul FLOP/s per dtype and memory bandwidth, each bounded in time.

Each figure is the best of a few timed repetitions after a warm-up, with the device synchronised around the clock
(CUDA, MPS); the matrix and buffer sizes grow until one repetition is long enough to time, within ``budget_s``.
The figures feed the planner's stage model (``core/planner.py``), so they measure what a decode step does: a big
GEMM for compute, a device-to-device copy for the weight reads.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

DTYPES = ("fp32", "fp16", "bf16")


def _sync(torch_mod: Any, device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        return lambda: torch_mod.cuda.synchronize(device)
    if device == "mps":
        return lambda: torch_mod.mps.synchronize()
    return lambda: None


def _best_time(fn: Callable[[], Any], sync: Callable[[], None], budget_s: float, reps: int = 5) -> float:
    """The shortest of up to ``reps`` timed calls of ``fn`` within ``budget_s`` (after one warm-up call)."""
    fn()
    sync()
    best, deadline = float("inf"), time.perf_counter() + budget_s
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    return best


def matmul_tflops(torch_mod: Any, device: str, dtype: str, budget_s: float = 0.6) -> float:
    """TFLOP/s of an n×n GEMM at ``dtype`` (0.0 when the device cannot run it); n grows from 256 by doubling
    while one product takes under a tenth of the budget (at most 8192)."""
    torch_dtype = {"fp32": torch_mod.float32, "fp16": torch_mod.float16, "bf16": torch_mod.bfloat16}[dtype]
    sync = _sync(torch_mod, device)
    n, took = 256, 0.0
    try:
        while True:
            a = torch_mod.randn(n, n, device=device, dtype=torch_dtype)
            b = torch_mod.randn(n, n, device=device, dtype=torch_dtype)
            took = _best_time(functools.partial(torch_mod.matmul, a, b), sync, budget_s / 4, reps=3)
            if took > budget_s / 10 or n >= 8192:
                break
            n *= 2
        took = _best_time(functools.partial(torch_mod.matmul, a, b), sync, budget_s / 2)
    except (RuntimeError, TypeError):  # e.g. a dtype this device's kernels lack
        return 0.0
    return 2 * n**3 / took / 1e12


def memory_gb_s(torch_mod: Any, device: str, budget_s: float = 0.4, max_bytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy (bytes read + bytes written per second), with a buffer that grows from 16 MiB
    while one copy takes under a tenth of the budget (at most ``max_bytes``)."""
    sync = _sync(torch_mod, device)
    size = 16 << 20
    while True:
        src = torch_mod.empty(size, dtype=torch_mod.uint8, device=device).fill_(1)
        dst = torch_mod.empty_like(src)
        took = _best_time(functools.partial(dst.copy_, src), sync, budget_s / 4, reps=3)
        if took > budget_s / 10 or size * 2 > max_bytes:
            break
        size *= 2
    took = _best_time(functools.partial(dst.copy_, src), sync, budget_s / 2)
    return 2 * size / took / 1e9


def measure(torch_mod: Any, device: str, dtypes: tuple[str, ...] = DTYPES, budget_s: float = 0.6) -> dict[str, Any]:
    """Every figure of one device: ``{"mem_bw_gb_s": …, "tflops": {dtype: …}}`` (a dtype that cannot run is left
    out)."""
    tflops = {d: round(v, 3) for d in dtypes if (v := matmul_tflops(torch_mod, device, d, budget_s)) > 0}
    return {"mem_bw_gb_s": round(memory_gb_s(torch_mod, device, budget_s * 2 / 3), 2), "tflops": tflops}
