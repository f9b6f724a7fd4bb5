"""Stage processes: how the head (``LocalCluster``) and a worker (``WorkerDaemon``) start one, and stop them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

#: one torch thread per stage process (DESIGN: several stages share a host's cores), no tokenizer threads
STAGE_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
STOP_GRACE_S = 3.0  # a stage asked to stop that has not exited by then is killed


def start_stage(assign: Mapping[str, Any], addresses: Mapping[str, Any]) -> subprocess.Popen[bytes]:
    """A stage process (``pipeline/worker.py``) for an Assign's fields, wired to ``addresses``."""
    cmd = [sys.executable, "-m", "homespec.pipeline.worker", "--assign", json.dumps(dict(assign))]
    return subprocess.Popen([*cmd, "--addresses", json.dumps(dict(addresses))], env={**os.environ, **STAGE_ENV})


def stop_stages(procs: Sequence[subprocess.Popen[bytes]], terminate: bool, grace_s: float = STOP_GRACE_S) -> None:
    """Wait for ``procs`` to exit (after SIGTERM when ``terminate``; else they were asked by a Shutdown message) and
    kill those still running after ``grace_s``."""
    if terminate:
        for p in procs:
            if p.poll() is None:
                p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.05, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)
