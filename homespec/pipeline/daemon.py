"""``homespec worker``: this machine's devices, served to a trusted head (DESIGN §2, §7).

Sockets, all on ``--port`` P and the ports after it:
- ``control`` (ROUTER, P): a CurveZMQ server that admits only the heads in ``trusted_heads`` (read again at every
  handshake, so ``homespec keys trust`` needs no restart). Hello, Deploy, Release, Heartbeat and Echo arrive here.
- ``info`` (plain TCP, P + 1): each connection is accepted, sent one packed WorkerInfo — the name, public key and
  devices that the zeroconf advert carries too — and closed at once; nothing is read from it, so no connection is
  held open and a flood of them costs the daemon no file descriptors. What it says is a claim: a head deploys only to
  a key its user trusts (HOST:PORT@KEY, ``homespec keys trust-worker``).
- each stage's input (P + 2 + slot, one slot per served device), bound by the stage process under CurveZMQ.

A **session** is one head's use of this worker: one Deploy per stage it places here. The worker starts one stage
process per Deploy (``homespec.pipeline.worker``, which loads only its layers from this machine's disk or cache and
talks to the head and its neighbours directly) and answers Deployed. The session ends on Release, when its head has
been silent for ``head_timeout_s`` (crashed, or the link is cut), or when the same head starts a new one: its stage
processes are stopped, which frees their memory, and the worker waits for the next head. Another head is refused
while a session's head is alive. A stage process that dies mid-session is reported to its head as a Failure.

The loop survives any input: an undecodable message is counted and dropped, an untrusted peer never gets past the
handshake (the refusals are counted by the gate), a connection that never finishes its handshake is dropped after
HANDSHAKE_S, and a failure inside a handler (a Deploy whose process cannot start, say) is answered to that head as
a Failure while the daemon goes on. At start the daemon raises its soft file limit to the hard one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import signal
import socket
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import zmq

from homespec.core.messages import (
    Assign,
    Deploy,
    Deployed,
    Echo,
    Failure,
    Heartbeat,
    Hello,
    Message,
    Release,
    WorkerInfo,
)
from homespec.errors import TransportError
from homespec.pipeline.procs import StageProcess, start_stage, stop_stages, warm_launcher
from homespec.transport.channel import Gatekeeper, curve_server
from homespec.transport.codec import decode, encode, pack_frames
from homespec.transport.keys import load_or_create, trusted_heads

log = logging.getLogger("homespec.daemon")

POLL_MS = 200
DAEMON_SENDER = -2  # the sender id of the worker's own Heartbeats (stages are 0..S-1, the head -1)
ASSIGN_FIELDS = tuple(f.name for f in fields(Assign))
HANDSHAKE_S = 5.0  # a connection to the control port that has not completed CurveZMQ by then is dropped
INFO_ACCEPTS_PER_POLL = 256  # info connections answered per loop turn (the rest wait in the listen backlog)
CONTROL_MAX_BYTES = 80 << 20  # the largest control message is a link-measuring Echo (64 MiB at most)


@dataclass
class _Session:
    id: int
    head_key: str
    identity: bytes  # the head's ROUTER identity
    heard: float
    stages: dict[int, StageProcess] = field(default_factory=dict)
    reported: set[int] = field(default_factory=set)  # stages whose exit was already reported


class WorkerDaemon:
    def __init__(
        self,
        port: int = 7650,
        name: str | None = None,
        devices: list[str] | None = None,
        host: str = "0.0.0.0",
        head_timeout_s: float = 10.0,
        advertise: bool = True,
        bench_budget_s: float = 0.4,
    ) -> None:
        from homespec.profiling.local import host_name

        self.port, self.host, self.head_timeout_s, self.bench_budget_s = port, host, head_timeout_s, bench_budget_s
        self.name = name or host_name()
        self.keys = load_or_create("worker")
        self.host_profile = _host_profile(self.name, devices)
        self.devices = [_torch_device(d.kind, d.index) for d in self.host_profile.devices]
        self.measured = False
        self.session: _Session | None = None
        self.bad_messages = 0
        raise_file_limit()
        self.ctx: zmq.Context[Any] = zmq.Context.instance()
        self.gatekeeper = Gatekeeper(self.ctx)
        self.gatekeeper.allow("head", lambda: trusted_heads().keys())
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.setsockopt(zmq.MAXMSGSIZE, CONTROL_MAX_BYTES)
        self.control.setsockopt(zmq.HANDSHAKE_IVL, int(HANDSHAKE_S * 1000))
        curve_server(self.control, self.keys, "head")
        self.control.bind(f"tcp://{host}:{port}")
        self.info = socket.create_server((host, port + 1), backlog=128)
        self.info.setblocking(False)
        self.advert = None
        if advertise:
            from homespec.transport.discovery import Advertiser

            self.advert = Advertiser(self.name, port, self.keys.public, None if host == "0.0.0.0" else [host])
        self._running = True
        warm_launcher()

    # -- the loop ------------------------------------------------------------------------------------------------
    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.info.fileno(), zmq.POLLIN)
        try:
            while self._running:
                events = dict(poller.poll(POLL_MS))
                if self.info.fileno() in events:
                    self._answer_info()
                if self.control in events:
                    self._on_control(self.control.recv_multipart(copy=False))
                self._watch_session()
        finally:
            self.close()

    def stop(self) -> None:
        self._running = False

    def close(self) -> None:
        self._end_session("worker stopping")
        if self.advert is not None:
            self.advert.close()
            self.advert = None
        self.control.close(linger=0)
        self.info.close()
        self.gatekeeper.stop()

    def _answer_info(self) -> None:
        """Each waiting info connection gets this worker's WorkerInfo and is closed; nothing is read from it."""
        payload = pack_frames(encode(self.worker_info()))
        for _ in range(INFO_ACCEPTS_PER_POLL):
            try:
                conn, _ = self.info.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, say: the connection stays in the backlog for later
                log.warning("info port: %s", exc)
                return
            with conn, contextlib.suppress(OSError):
                conn.setblocking(False)
                conn.send(payload)  # a few KiB into an empty socket buffer; a peer that lost it asks again

    def _on_control(self, frames: list[Any]) -> None:
        if len(frames) < 2:
            self.bad_messages += 1
            return
        identity, head_key = frames[0].bytes, str(frames[1].get("User-Id"))
        try:
            msg = decode(frames[1:])
        except TransportError as exc:
            self.bad_messages += 1
            log.warning("dropped a malformed message from head %s: %s", head_key[:8], exc)
            return
        s = self.session
        if s is not None and s.head_key == head_key:
            s.heard = time.monotonic()
        try:
            self._dispatch(identity, head_key, msg)
        except Exception as exc:  # a handler's failure is that head's answer, never the daemon's end
            log.exception("handling a %s from head %s failed", msg.kind, head_key[:8])
            stage = msg.stage if isinstance(msg, Deploy) else 0
            self._reply(identity, Failure(stage, 0, f"worker {self.name} failed: {type(exc).__name__}: {exc}"))

    def _dispatch(self, identity: bytes, head_key: str, msg: Message) -> None:
        s = self.session
        if isinstance(msg, Hello):
            self._reply(identity, self.worker_info(measure=msg.measure))
        elif isinstance(msg, Heartbeat):
            self._reply(identity, Heartbeat(DAEMON_SENDER, msg.seq, self.bad_messages))
        elif isinstance(msg, Echo):
            self._reply(identity, msg)
        elif isinstance(msg, Deploy):
            self._deploy(identity, head_key, msg)
        elif isinstance(msg, Release):
            if s is not None and s.head_key == head_key and s.id == msg.session:
                self._end_session(f"released by its head: {msg.reason}")
        else:
            self.bad_messages += 1

    def _reply(self, identity: bytes, msg: Message) -> None:
        self.control.send_multipart([identity, *encode(msg)], copy=False)

    # -- sessions ------------------------------------------------------------------------------------------------
    def _deploy(self, identity: bytes, head_key: str, msg: Deploy) -> None:
        s = self.session
        if s is not None and s.id != msg.session:
            if s.head_key != head_key and time.monotonic() - s.heard < self.head_timeout_s:
                self._reply(identity, Failure(msg.stage, 0, f"worker {self.name} is busy with another head's session"))
                return
            self._end_session("a new session began")
            s = None
        if s is None:
            s = self.session = _Session(msg.session, head_key, identity, time.monotonic())
        if not (0 <= msg.slot < len(self.devices)) or self.devices[msg.slot] != msg.device:
            self._reply(identity, Failure(msg.stage, 0, f"worker {self.name} has no device {msg.device} at {msg.slot}"))
            return
        if msg.stage in s.stages:
            self._reply(identity, Failure(msg.stage, 0, f"stage {msg.stage} is already running here"))
            return
        in_address = f"tcp://{self.host}:{self.port + 2 + msg.slot}"
        addresses = {
            "in": in_address,
            "out": msg.next_address,
            "control": msg.control_address,
            "report": msg.report_address,
            "curve": {"out_key": msg.next_key, "head_key": msg.head_key, "allow": [msg.upstream_key]},
        }
        assign = {k: v for k, v in asdict(msg).items() if k in ASSIGN_FIELDS}
        s.stages[msg.stage] = start_stage(assign, addresses)
        log.info(
            "session %d: stage %d (layers %d-%d) on %s", s.id, msg.stage, msg.layer_start, msg.layer_end, msg.device
        )
        self._reply(identity, Deployed(s.id, msg.stage, in_address))

    def _watch_session(self) -> None:
        s = self.session
        if s is None:
            return
        if time.monotonic() - s.heard > self.head_timeout_s:
            reason = f"worker {self.name} ended the session: its head was silent for {self.head_timeout_s:g} s"
            self._reply(s.identity, Failure(min(s.stages, default=0), 0, reason))  # a head that still lives knows
            self._end_session(reason)
            return
        for stage, proc in s.stages.items():
            code = proc.poll()
            if code is not None and stage not in s.reported:
                s.reported.add(stage)
                reason = f"the stage process on worker {self.name} exited with code {code}"
                self._reply(s.identity, Failure(stage, 0, reason))

    def _end_session(self, reason: str) -> None:
        s, self.session = self.session, None
        if s is None:
            return
        log.info("session %d ends: %s", s.id, reason)
        stop_stages(list(s.stages.values()), terminate=True)

    # -- what the worker is --------------------------------------------------------------------------------------
    def worker_info(self, measure: bool = False) -> WorkerInfo:
        """This worker's identity and devices; ``measure``: its micro-benchmarks first (once, then cached; not while
        a session runs, since they would compete with its stages)."""
        if measure and not self.measured and self.session is None:
            self.host_profile = _measure(self.host_profile, self.devices, self.bench_budget_s)
            self.measured = True
        return WorkerInfo(
            self.name,
            self.keys.public,
            self.port,
            tuple(self.devices),
            json.dumps(asdict(self.host_profile)),
            self.session.id if self.session else 0,
        )


def raise_file_limit() -> None:
    """Raise this process's soft limit on open files to its hard limit (each connection holds one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _torch_device(kind: str, index: int) -> str:
    return f"cuda:{index}" if kind == "cuda" else kind


def _host_profile(name: str, devices: list[str] | None) -> Any:
    """This machine's host profile (devices detected now, not measured), limited to ``devices`` when given."""
    from homespec.errors import ConfigError
    from homespec.profiling.devices import detect
    from homespec.profiling.profile import HostProfile

    found = detect()
    if devices:
        by_name = {_torch_device(d.kind, d.index): d for d in found}
        missing = [d for d in devices if d not in by_name]
        if missing:
            raise ConfigError(f"no such device here: {', '.join(missing)}", hint=f"found: {', '.join(by_name)}")
        found = [by_name[d] for d in devices]
    return HostProfile(name, tuple(found))


def _measure(host: Any, devices: list[str], budget_s: float) -> Any:
    """``host`` with each of its devices measured."""
    import torch

    from homespec.profiling.microbench import measure

    measured = []
    for d, where in zip(host.devices, devices, strict=True):
        figures = measure(torch, where, budget_s=budget_s)
        measured.append(replace(d, mem_bw_gb_s=figures["mem_bw_gb_s"], tflops=figures["tflops"]))
    return replace(host, devices=tuple(measured))
