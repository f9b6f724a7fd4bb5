"""Stage processes: how the head (``LocalCluster``) and a worker (``WorkerDaemon``) start one, and stop them."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

log = logging.getLogger(__name__)

#: one torch thread per stage process (DESIGN: several stages share a host's cores), no tokenizer threads
STAGE_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
STOP_GRACE_S = 3.0  # a stage asked to stop that has not exited by then is killed
LAUNCH_TIMEOUT_S = 60.0  # the launcher's first answer waits for its torch import


class StageProcess(Protocol):
    """What the clusters use of a stage process: a ``subprocess.Popen``, or a ``Forked`` stage."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


def start_stage(assign: Mapping[str, Any], addresses: Mapping[str, Any]) -> StageProcess:
    """A stage process (``pipeline/worker.py``) for an Assign's fields, wired to ``addresses``: forked by this
    process's launcher (``pipeline/launcher.py``), or started as a new Python process where the launcher cannot run
    (``HOMESPEC_STAGE_LAUNCHER=0``, or it failed: said once in the log)."""
    if os.environ.get("HOMESPEC_STAGE_LAUNCHER", "1") != "0":
        forked = _launcher().start(assign, addresses)
        if forked is not None:
            return forked
    cmd = [sys.executable, "-m", "homespec.pipeline.worker", "--assign", json.dumps(dict(assign))]
    cmd += ["--addresses", json.dumps(dict(addresses)), "--parent", str(os.getpid())]
    return subprocess.Popen(cmd, env={**os.environ, **STAGE_ENV})


class Forked:
    """A stage forked by the launcher (not this process's child): its exit code is what the launcher reported."""

    def __init__(self, launcher: Launcher, pid: int) -> None:
        self._launcher, self.pid = launcher, pid
        self._code: int | None = None

    def poll(self) -> int | None:
        if self._code is None:
            self._code = self._launcher.take_exit(self.pid)
        return self._code

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"stage pid {self.pid}", timeout or 0.0)
            time.sleep(0.02)
        return code

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)


class Launcher:
    """This process's stage launcher (``pipeline/launcher.py``) and a thread reading its answers."""

    def __init__(self) -> None:
        cmd = [sys.executable, "-m", "homespec.pipeline.launcher"]
        env = {**os.environ, **STAGE_ENV}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.owner = os.getpid()
        self.exits: dict[int, int] = {}  # reported and not yet taken by the stage's Forked (``take_exit``)
        self.started: queue.Queue[int] = queue.Queue()
        self.lock = threading.Lock()
        threading.Thread(target=self._read, name="stage-launcher", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            msg = json.loads(line)
            if "pid" in msg:
                self.started.put(int(msg["pid"]))
            else:
                self.exits[int(msg["exit"])] = int(msg["code"])

    def start(self, assign: Mapping[str, Any], addresses: Mapping[str, Any]) -> Forked | None:
        """A forked stage, or None when the launcher is gone or does not answer within a minute."""
        request = {"assign": dict(assign), "addresses": dict(addresses), "env": {**os.environ, **STAGE_ENV}}
        with self.lock:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write((json.dumps(request) + "\n").encode())
                self.proc.stdin.flush()
                pid = self.started.get(timeout=LAUNCH_TIMEOUT_S)
            except (OSError, queue.Empty) as exc:
                log.warning("the stage launcher failed (%s): starting this stage as a new process", exc)
                self.proc.kill()  # never waited for again, and a late answer can never name the next stage
                return None
        return Forked(self, pid)

    def take_exit(self, pid: int) -> int | None:
        """The stage's exit code once the launcher has reported it, handed over once (its ``Forked`` keeps it, so
        the table holds only stages that exited unobserved, and a reused pid never reads a stale code)."""
        code = self.exits.pop(pid, None)  # one atomic step: the reader thread only adds
        if code is None and self.proc.poll() is not None and not os.path.exists(f"/proc/{pid}"):
            return -signal.SIGKILL  # the launcher died and its stage is gone too
        return code

    def alive(self) -> bool:
        return self.owner == os.getpid() and self.proc.poll() is None


_LAUNCHER: Launcher | None = None
_LAUNCHER_LOCK = threading.Lock()


def warm_launcher() -> None:
    """Start this process's launcher now (its torch import runs beside whatever comes next), so that the first
    stage costs a fork too: a worker daemon calls this at start, since a Deploy must be answered promptly (the head
    waits for it, and the other workers count the head's silence meanwhile)."""
    if os.environ.get("HOMESPEC_STAGE_LAUNCHER", "1") != "0":
        _launcher()


def _launcher() -> Launcher:
    global _LAUNCHER
    with _LAUNCHER_LOCK:
        if _LAUNCHER is None or not _LAUNCHER.alive():
            _LAUNCHER = Launcher()
        return _LAUNCHER


def stop_stages(procs: Sequence[StageProcess], terminate: bool, grace_s: float = STOP_GRACE_S) -> None:
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
