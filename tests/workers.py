"""Helpers for tests with real ``homespec worker`` processes: free port blocks, key folders, starting and stopping
workers (optionally inside a network namespace)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HOMESPEC = str(Path(sys.executable).parent / "homespec")


def free_port_block(n: int = 4, host: str = "127.0.0.1") -> int:
    """A port P such that P .. P + n - 1 are free now."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind((host, p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")


def public_key(config: Path, role: str) -> str:
    out = subprocess.run([HOMESPEC, "keys"], env={**os.environ, "HOMESPEC_CONFIG": str(config)}, capture_output=True,
                         text=True, check=True)  # fmt: skip
    for line in out.stdout.splitlines():
        if line.startswith(f"{role} key:"):
            return line.split(":", 1)[1].split()[0]  # "head key: KEY  (fingerprint …)"
    raise AssertionError(out.stdout)


def trust(config: Path, head_key: str) -> None:
    env = {**os.environ, "HOMESPEC_CONFIG": str(config)}
    subprocess.run([HOMESPEC, "keys", "trust", "--", head_key], env=env, check=True, capture_output=True)


def trust_worker(head_config: Path, worker_config: Path) -> None:
    """The head (``head_config``) trusts the worker whose keys are in ``worker_config``."""
    env = {**os.environ, "HOMESPEC_CONFIG": str(head_config)}
    key = public_key(worker_config, "worker")
    subprocess.run([HOMESPEC, "keys", "trust-worker", "--", key], env=env, check=True, capture_output=True)


def pair(worker_config: Path, head_config: Path) -> None:
    """Trust both ways, as a user does once per machine: the worker serves the head, the head deploys to it."""
    trust(worker_config, public_key(head_config, "head"))
    trust_worker(head_config, worker_config)


def start_worker(
    config: Path,
    port: int,
    name: str,
    host: str = "127.0.0.1",
    netns: str | None = None,
    advertise: bool = False,
    head_timeout: float = 3.0,
    log: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """A ``homespec worker`` that answers on its info port (waited for)."""
    cmd = [HOMESPEC, "worker", "--port", str(port), "--name", name, "--host", host, "--bench-budget", "0.05"]
    cmd += ["--head-timeout", str(head_timeout), "--advertise" if advertise else "--no-advertise"]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    env = {**(env or os.environ), "HOMESPEC_CONFIG": str(config)}
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 (the child owns it)
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_info(host, port, netns, proc)
    return proc


def wait_for_info(host: str, port: int, netns: str | None, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Until the worker's info port answers (from inside ``netns`` when given)."""
    probe = (
        "import sys; from homespec.transport.discovery import Peer; from homespec.pipeline.remote import fetch_info;"
        "fetch_info(Peer('w', sys.argv[1], int(sys.argv[2])), 1.0)"
    )
    cmd = [sys.executable, "-c", probe, "127.0.0.1" if host == "0.0.0.0" else host, str(port)]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"worker on {host}:{port} exited with code {proc.returncode}")
        if subprocess.run(cmd, capture_output=True).returncode == 0:
            return
    raise AssertionError(f"worker on {host}:{port} never answered")


def stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=5)


def stage_pids(worker: subprocess.Popen[bytes]) -> list[int]:
    """The stage processes a worker started."""
    return stage_processes(worker.pid)


def stage_processes(ancestor: int) -> list[int]:
    """Live stage processes descending from ``ancestor``: forked by a stage launcher (named ``homespec-stage``,
    pipeline/launcher.py) or started as ``python -m homespec.pipeline.worker``."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (entry / "cmdline").read_bytes()
            name = (entry / "comm").read_text().strip()
        except (OSError, IndexError):
            continue
        stage = name == "homespec-stage" or b"homespec.pipeline.worker" in cmd
        if fields[0] != "Z" and stage and _descends(int(entry.name), ancestor):
            out.append(int(entry.name))
    return out


def _descends(pid: int, ancestor: int) -> bool:
    for _ in range(8):
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
    return False
