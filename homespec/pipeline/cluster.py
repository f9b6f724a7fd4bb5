"""Clusters of stages, as the head sees them: where the messages go and how a lost stage is noticed.

``Cluster`` is the head's side of the wire, whatever runs the stages: it binds ``results`` (PULL: Results from the
last stage) and ``report`` (PULL: pongs, stats, failures from every stage), publishes on ``control`` (PUB: Start,
Prune, Abort, Heartbeat, Shutdown) and pushes waves into the first stage's ``in``.

``LocalCluster``: S stage processes on this machine, wired over ``ipc://`` sockets in a private folder. It owns the
processes: ``close()`` (also on exit, Ctrl-C or a crash of any stage) shuts them down, kills what does not stop,
and removes the sockets' folder, so nothing is left behind. A stage that exits is seen by its process status.
The remote kind, stages served by ``homespec worker`` on other machines over CurveZMQ, is ``pipeline/remote.py``.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import zmq

from homespec.core.messages import Assign, Failure, Heartbeat, Message, Shutdown, StageStats
from homespec.errors import PeerLostError
from homespec.pipeline.procs import StageProcess, start_stage, stop_stages
from homespec.transport.codec import decode, encode

READY_TIMEOUT_S = 120.0
PEER_TIMEOUT_S = 10.0  # a stage silent this long (hung, stopped, cut off) fails the request (--peer-timeout)
PING_EVERY_S = 1.0
CHECK_EVERY_S = 0.2  # how often the head looks for a lost stage while it waits
PING_SEQ_BASE = 1 << 40  # liveness pings, apart from sync's sequence numbers


class Cluster(ABC):
    """The head's sockets and message loop; subclasses start the stages, say how a lost one is seen
    (``check_alive``) and stop them (``close``)."""

    def __init__(
        self,
        assigns: Sequence[Assign],
        progress: Callable[[str], None] | None = None,
        timeout_s: float = PEER_TIMEOUT_S,
    ) -> None:
        self._progress = progress or (lambda text: None)
        self.timeout_s = timeout_s
        self._ping_seq = itertools.count(PING_SEQ_BASE)
        self._last_ping = self._checked = 0.0
        self._since: float | None = None  # liveness counts from here (set once every stage has answered)
        self.assigns = list(assigns)
        self.size = len(assigns)
        self.weight_bytes = [0] * self.size  # each stage's, as it said when it had loaded
        self.ctx: zmq.Context[Any] = zmq.Context.instance()
        self._request_ids = itertools.count(1)
        self.failed: dict[int, str] = {}  # request -> why a stage failed it (the request alone ends; newest 256)
        self.stage_stats: dict[int, dict[int, StageStats]] = {}  # request -> stage -> its stats, as they arrive
        self.tick = 0  # pipeline steps so far, over every decoder of this cluster (waves of one tick share a step)
        self.last_heard: dict[int, float] = {}  # stage -> when a message of it was last read (monotonic)
        # set by a subclass: results (PULL), report (PULL), control (PUB), first (PUSH into stage 0)
        self.results: Any = None
        self.report: Any = None
        self.control: Any = None
        self.first: Any = None

    def _bind(self, kind: int, address: str, setup: Callable[[Any], Any] | None = None) -> Any:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if setup is not None:
            setup(sock)
        sock.bind(address)
        return sock

    @abstractmethod
    def check_alive(self) -> None:
        """Raise PeerLostError when a stage is gone: a subclass checks what it can see (a process that exited, a
        worker's report), then ``check_heard``."""

    @abstractmethod
    def close(self) -> None:
        """Stop the stages and close the sockets (idempotent)."""

    def outdated(self) -> bool:
        """The cluster could be better now (a worker missing when it was built answers again): never, here."""
        return False

    def check_heard(self) -> None:
        """While the head waits for the stages, ping every stage on the control broadcast once a second; a stage that
        has not answered for ``timeout_s`` (hung, stopped, cut off) is a PeerLostError naming it. Silence while the
        head was not waiting (between requests, or busy itself) is not counted against the stages."""
        if self._since is None:
            return
        now = time.monotonic()
        if now - self._last_ping > 2 * PING_EVERY_S:
            self._since = now
        if now - self._last_ping >= PING_EVERY_S:
            self._last_ping = now
            self.broadcast(Heartbeat(-1, next(self._ping_seq)))
        for i in range(self.size):
            silent = now - max(self.last_heard.get(i, self._since), self._since)
            if silent > self.timeout_s:
                raise PeerLostError(
                    f"{self.stage_name(i)} has not answered for {silent:.0f} s (--peer-timeout {self.timeout_s:g})",
                    hint="it may be hung, stopped or cut off; the request was cancelled",
                )

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stage_name(self, i: int) -> str:
        a = self.assigns[i]
        return f"stage {i} (layers {a.layer_start}-{a.layer_end - 1})"

    # -- lifecycle -----------------------------------------------------------------------------------------
    def _wait_ready(self) -> None:
        """Every stage said it loaded; then ping on control until every stage answers (SUB is connected)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        ready: set[int] = set()
        while len(ready) < self.size:
            msg = self.recv_report(deadline)
            if isinstance(msg, Heartbeat) and msg.sender not in ready:
                ready.add(msg.sender)
                if 0 <= msg.sender < self.size:
                    self.weight_bytes[msg.sender] = msg.weight_bytes
                a = self.assigns[msg.sender] if 0 <= msg.sender < self.size else None
                layers = f" (layers {a.layer_start}–{a.layer_end - 1})" if a else ""
                self._progress(f"stage {msg.sender + 1} ready{layers}: {len(ready)} of {self.size}")
        self.sync(seq=-1, deadline=deadline)

    def sync(self, seq: int, deadline: float) -> None:
        """Broadcast a ping until every stage echoes ``seq``."""
        answered: set[int] = set()
        while len(answered) < self.size:
            if time.monotonic() >= deadline:
                silent = ", ".join(str(i + 1) for i in range(self.size) if i not in answered)
                raise PeerLostError(f"stage(s) {silent} did not answer in time", hint="a stage may be hung or gone")
            self.broadcast(Heartbeat(sender=-1, seq=seq))
            end = time.monotonic() + 0.05
            while time.monotonic() < end and len(answered) < self.size:
                msg = self.recv_report(deadline, wait_s=0.05)
                if isinstance(msg, Heartbeat) and msg.seq == seq:
                    answered.add(msg.sender)
        self._since = time.monotonic()

    def collect_stats(self, request: int, wait_s: float = 2.0) -> list[StageStats]:
        """Every stage's StageStats for a finished request (sent on Abort), ordered by stage; missing ones are
        left out after ``wait_s`` (0: only those already read)."""
        deadline = time.monotonic() + wait_s
        while len(self.stage_stats.get(request, {})) < self.size and time.monotonic() < deadline:
            self.recv_report(deadline, wait_s=deadline - time.monotonic())
        got = self.stage_stats.get(request, {})
        if len(got) == self.size or wait_s > 0:
            self.stage_stats.pop(request, None)
        return [got[i] for i in sorted(got)]

    def new_request_id(self) -> int:
        """Request ids are unique per cluster, so late results of an abandoned request are never mistaken."""
        return next(self._request_ids)

    # -- messaging -----------------------------------------------------------------------------------------
    def send_first(self, msg: Message) -> None:
        """Into stage 0; a stage that takes nothing for ``timeout_s`` (hung, its queue full) is a lost stage."""
        try:
            self.first.send_multipart(encode(msg), copy=False)
        except zmq.Again as exc:
            raise PeerLostError(
                f"stage 0 took no input for {self.timeout_s:g} s", hint="a stage may be hung or overloaded"
            ) from exc

    def _connect_first(self, address: str, setup: Callable[[Any], Any] | None = None) -> None:
        """The PUSH into stage 0: sends wait at most ``timeout_s`` (``send_first``), so the head never blocks on a
        stage that stopped reading."""
        self.first = self.ctx.socket(zmq.PUSH)
        self.first.setsockopt(zmq.LINGER, 0)
        self.first.setsockopt(zmq.SNDTIMEO, max(1, int(self.timeout_s * 1000)))
        if setup is not None:
            setup(self.first)
        self.first.connect(address)

    def broadcast(self, msg: Message) -> None:
        self.control.send_multipart(encode(msg), copy=False)

    def broadcast_raw(self, frames: Sequence[bytes]) -> None:
        """Send arbitrary frames on the control channel (tests of hostile input)."""
        self.control.send_multipart(list(frames))

    def recv_result(self, deadline: float) -> Message | None:
        """The next message from the last stage, or None when a stage failed a request meanwhile (see ``failed``);
        PeerLostError if a stage dies or the deadline passes."""
        msg = self._recv(self.results, deadline)
        if msg is None and time.monotonic() >= deadline:
            raise PeerLostError("no result from the pipeline in time", hint="a stage may be hung or overloaded")
        return msg

    def recv_report(self, deadline: float, wait_s: float | None = None) -> Message | None:
        """The next pong/stats message from any stage, or None once ``wait_s`` (or the deadline) passes."""
        end = deadline if wait_s is None else min(deadline, time.monotonic() + wait_s)
        msg = self._recv(self.report, end)
        if msg is None and wait_s is None:
            raise PeerLostError("the stages did not answer in time", hint="a stage may be hung or still loading")
        return msg

    def _recv(self, sock: Any, deadline: float) -> Message | None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if sock is not self.report:
            poller.register(self.report, zmq.POLLIN)
        while True:
            timeout = max(0.0, min(0.1, deadline - time.monotonic()))
            events = dict(poller.poll(int(timeout * 1000)))
            if self.report in events:
                msg = decode(self.report.recv_multipart(copy=False))
                sender = getattr(msg, "sender", getattr(msg, "stage", None))
                if isinstance(sender, int):
                    self.last_heard[sender] = time.monotonic()
                if isinstance(msg, Failure) and msg.request == 0:
                    raise PeerLostError(f"stage {msg.stage} failed to start: {msg.message}")
                if isinstance(msg, Failure):  # one request's fault: the decoder ends that request alone
                    self.failed.setdefault(msg.request, f"stage {msg.stage} failed request: {msg.message}")
                    if len(self.failed) > 256:
                        del self.failed[min(self.failed)]
                    if sock is not self.report:
                        return None  # the reader of results decides whose request it was
                if isinstance(msg, StageStats):  # kept for collect_stats, whoever was reading (the newest 256)
                    self.stage_stats.setdefault(msg.request, {})[msg.stage] = msg
                    if len(self.stage_stats) > 256:
                        del self.stage_stats[min(self.stage_stats)]
                if sock is self.report:
                    return msg
            now = time.monotonic()
            if now - self._checked >= CHECK_EVERY_S or not events:  # also while results keep coming
                self._checked = now
                self.check_alive()
            if sock in events and sock is not self.report:
                self.last_heard[self.size - 1] = now
                return decode(sock.recv_multipart(copy=False))
            if time.monotonic() >= deadline:
                return None


class LocalCluster(Cluster):
    def __init__(
        self,
        assigns: Sequence[Assign],
        progress: Callable[[str], None] | None = None,
        timeout_s: float = PEER_TIMEOUT_S,
    ) -> None:
        """Start one process per Assign and wait until every stage has loaded; ``progress`` hears each one."""
        super().__init__(assigns, progress, timeout_s)
        self._dir = tempfile.mkdtemp(prefix="homespec-")
        addr = {name: f"ipc://{self._dir}/{name}" for name in ("results", "report", "control")}
        self.results = self._bind(zmq.PULL, addr["results"])
        self.report = self._bind(zmq.PULL, addr["report"])
        self.control = self._bind(zmq.PUB, addr["control"])
        self.inputs = ins = [f"ipc://{self._dir}/stage{i}" for i in range(self.size)]
        self._connect_first(ins[0])
        self.procs: list[StageProcess] = []
        for i, a in enumerate(self.assigns):
            addresses = {
                "in": ins[i],
                "out": ins[i + 1] if i + 1 < self.size else addr["results"],
                "control": addr["control"],
                "report": addr["report"],
            }
            self.procs.append(start_stage(asdict(a), addresses))
        atexit.register(self.close)
        self._wait_ready()

    def close(self) -> None:
        if not self.procs:
            return
        with contextlib.suppress(zmq.ZMQError):
            self.broadcast(Shutdown("head closing"))
        stop_stages(self.procs, terminate=False)
        self.procs = []
        for s in (self.results, self.report, self.control, self.first):
            s.close(linger=0)
        shutil.rmtree(self._dir, ignore_errors=True)
        atexit.unregister(self.close)

    def check_alive(self) -> None:
        for i, p in enumerate(self.procs):
            code = p.poll()
            if code is not None:
                raise PeerLostError(
                    f"{self.stage_name(i)} (pid {p.pid}) exited with code {code}",
                    hint="see the stage's log above; the request was cancelled",
                )
        self.check_heard()
