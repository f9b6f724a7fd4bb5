"""The stage launcher: one process per head (or worker) that has imported torch and the stage code once, and forks a
stage process for each request, so that starting a stage costs a fork instead of a Python start and a torch import
(2.5 s of CPU apiece on a small CPU; 8 stages on 2 cores took ~10 s).

Protocol, one JSON object per line: the parent writes ``{"assign": {...}, "addresses": {...}, "env": {...}}`` on the
launcher's stdin and reads ``{"pid": N}`` back on its stdout; whenever a stage exits, the launcher reaps it and writes
``{"exit": N, "code": C}`` (C as ``subprocess`` reports it: negative for a signal). The launcher exits when its stdin
closes (its parent is gone, or closed it); a stage notices that its parent (the launcher) is gone and exits too
(``worker.StageWorker._orphaned``), so a killed head still leaves no stage behind.

A stage is forked before it computes anything: the launcher never runs a torch operation, so no thread pool exists
to be copied half-way. Each stage gets the environment its parent had when it asked (``env``), then calls the same
``worker.main`` a stage started as ``python -m homespec.pipeline.worker`` calls, and ends with ``os._exit`` once that
has closed its sockets (their pending messages sent): the interpreter's teardown of a process holding torch took
~1 s, which every cluster's close waited for. A stage's exit wakes the launcher at once (SIGCHLD through a wakeup
pipe), so the head hears it without waiting out a poll.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import json
import os
import select
import signal
import sys
from typing import Any


def _exit_code(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


STAGE_NAME = b"homespec-stage"  # a forked stage's process name (/proc/PID/comm), for ps and tests


def _run_stage(request: dict[str, Any], launcher: int, wakeup: tuple[int, int]) -> None:
    """In the forked child: detach from the launcher's input and its wakeup pipe, take the asked environment and
    name, run the stage (which exits once the ``launcher`` pid is no longer its parent; ``worker.main`` closes its
    sockets, what they still hold sent first), and end without the interpreter's teardown."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # a stage's prints go where its logs go, never into the launcher's answers
    signal.set_wakeup_fd(-1)
    for fd in wakeup:
        os.close(fd)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    faulthandler.enable()  # a stage that crashes in native code leaves its stack in the log
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(15, STAGE_NAME, 0, 0, 0)  # PR_SET_NAME (Linux)
    os.environ.clear()
    os.environ.update(request["env"])
    from homespec.pipeline.worker import main

    code = 0
    try:
        args = ["--assign", json.dumps(request["assign"]), "--addresses", json.dumps(request["addresses"])]
        main([*args, "--parent", str(launcher)])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _reap(out: Any) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = _exit_code(status)
        if code:
            print(f"homespec launcher: stage process {pid} exited with code {code}", file=sys.stderr, flush=True)
        out.write(json.dumps({"exit": pid, "code": code}) + "\n")
        out.flush()


def main() -> None:
    import torch  # noqa: F401  (imported once here, shared by every forked stage)
    import zmq  # noqa: F401

    import homespec.model.stage
    import homespec.pipeline.worker  # noqa: F401

    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    stdin = sys.stdin.buffer
    buffer = b""
    me = os.getpid()  # each stage's parent: a stage whose parent is another (init: the launcher died) exits
    wakeup = os.pipe()  # a stage's exit (SIGCHLD) makes its read end readable: reaped and reported at once
    for fd in wakeup:
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(wakeup[1])
    signal.signal(signal.SIGCHLD, lambda *_: None)
    while True:
        ready, _, _ = select.select([stdin, wakeup[0]], [], [], 0.2)
        if wakeup[0] in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wakeup[0], 1 << 12)
        _reap(out)
        if stdin not in ready:
            continue
        chunk = os.read(stdin.fileno(), 1 << 16)
        if not chunk:
            break  # the parent is gone or closed the pipe: stop launching; running stages follow their own rule
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                _run_stage(request, me, wakeup)
            out.write(json.dumps({"pid": pid}) + "\n")
            out.flush()
    _reap(out)


if __name__ == "__main__":
    main()
