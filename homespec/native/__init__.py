"""Native decode glue for CPU stages: ``glue.c``, built once per machine by the system's C compiler.

At one row a quantized layer is ~230 small torch operators around its four int4 products, and each costs its
call more than its arithmetic: on the bundled model the products take 5.0 ms of a 10.8 ms decode step
(BENCHMARKS.md §6). ``glue.c`` does the rest of a Llama layer (RMSNorm, RoPE and the cache writes, attention in
fp32, SwiGLU, the residual adds) in five calls per layer, through ``ctypes``. int4 products stay torch's own
kernels; int8 and float ones (fp32, bf16) at decoding's few rows run in the glue's own (``hs_linear_i8``,
``hs_linear_f32``, ``hs_linear_bf16``: torch's cost 2-4x as much there). ``library()`` compiles the source with
``cc -O3 -march=native`` into HomeSpec's cache (keyed by the source, the compiler and the CPU), loads it, and returns
None with a one-line notice where there is no compiler or the build fails: stages then run the same layers in torch
(``model/stage.py``). ``HOMESPEC_NATIVE=0`` turns it off. ``python -m homespec.native`` builds it now
(``install.sh`` does).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from homespec.config import cache_dir

SOURCE = Path(__file__).with_name("glue.c")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC")
#: tried first: torch's CPU build runs OpenMP (libgomp.so.1), which the loaded glue then shares, with torch's
#: thread count (``torch.set_num_threads``); where the compiler has no OpenMP (Apple's clang), one thread
OPENMP = ("-fopenmp",)

_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
#: each function's argument types (glue.c's comments say what they are)
SIGNATURES = {
    "hs_rms": [_P, _P, _I, _I, _F, _P, _I],
    "hs_add_rms": [_P, _P, _P, _I, _I, _F, _P, _I],
    "hs_rope_store": [_P, _P, _P, _I, _I, _I, _I, _P, _P, _P, _I, _I, _I, _I],
    "hs_attend": [_P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _F, _P, _P, _I, _I],
    "hs_silu_mul": [_P, _I, _I, _P, _I],
    "hs_linear_f32": [_P, _P, _I, _I, _I, _P, _I],
    "hs_linear_bf16": [_P, _P, _I, _I, _I, _P, _I],
    "hs_linear_i8": [_P, _P, _P, _I, _I, _I, _P, _I, _P],
}


def enabled() -> bool:
    """False where ``HOMESPEC_NATIVE=0`` asks for torch's operators only."""
    return os.environ.get("HOMESPEC_NATIVE", "1") != "0"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_key() -> str:
    """What -march=native compiles for: the CPU's model and flags where Linux says, else the platform."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def library_path(compiler: str) -> Path:
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), compiler.encode(), " ".join(FLAGS).encode(), _cpu_key().encode()):
        key.update(part)
        key.update(b"\0")
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    return cache_dir() / "native" / f"glue-{platform.machine()}-{key.hexdigest()[:16]}{suffix}"


def build() -> Path:
    """Compile ``glue.c`` into the cache (once: a built library is reused); raises RuntimeError on failure."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (cc, gcc or clang; or set CC)")
    out = library_path(compiler)
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # said while it waits: the first stage after an upgrade (or a cleared cache) pays this once (~1 s here)
    print(f"homespec: compiling the native decode glue ({compiler}, once per source and CPU)...", file=sys.stderr)
    fd, tmp = tempfile.mkstemp(suffix=out.suffix, dir=out.parent)
    os.close(fd)
    try:
        for threads in (OPENMP, ()):  # attention's items over torch's OpenMP threads, else one thread
            done = subprocess.run(
                [compiler, *FLAGS, *threads, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True, timeout=300
            )
            if done.returncode == 0:
                break
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, out)  # atomic: stage processes starting together each build, one library lands
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded glue, or None (disabled, or it could not be built: a one-line notice on stderr)."""
    if not enabled():
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(f"homespec: native decode glue unavailable ({e}); stages run torch operators", file=sys.stderr)
        return None
    for name, args in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    return lib
