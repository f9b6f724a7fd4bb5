"""Stages on other machines: the head's side of ``homespec worker`` (DESIGN §2, §6, §7).

``connect`` opens a CurveZMQ connection to a worker's control socket and tells a worker that refuses this head's key
apart from one that does not answer. Trust (DESIGN §7): the head connects only to a key the user gave it — pinned
(``HOST:PORT@KEY``, a profile saved by ``homespec profile --lan --save``) or in ``trusted_workers`` (``homespec keys
trust-worker``). A key from the advert or the worker's plain info port is only a claim, checked against those before
anything is sent: an unknown key is refused with UntrustedPeerError (naming the key, its fingerprint, and how to
trust it), and the handshake then proves the worker holds the secret of the key it was trusted for.

``build`` asks the workers what they have, plans the layers on their devices
(``core/planner.py``), and ``RemoteCluster`` deploys that plan: one Deploy per stage, the stages wired to each other
and to the head over CurveZMQ (each stage's input admits only its predecessor's key, the head's sockets only the
session's workers).

Liveness: a thread sends every worker a Heartbeat each second and reads what the workers say on their control
sockets (a stage process that died is a Failure); the decoding loop pings the stages themselves on the control
broadcast and fails the request with PeerLostError when a stage or a worker has been silent for ``timeout_s``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import shlex
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from homespec.core.messages import Deploy, Deployed, Failure, Heartbeat, Hello, Release, Shutdown, WorkerInfo
from homespec.core.planner import Device
from homespec.core.step import DEFAULT_MAX_TREE
from homespec.errors import ConfigError, PeerLostError, PlanError, TransportError, UntrustedPeerError
from homespec.pipeline.cluster import PEER_TIMEOUT_S, PING_EVERY_S, Cluster
from homespec.transport.channel import Gatekeeper, HandshakeWatch, curve_client, curve_server
from homespec.transport.codec import decode, encode
from homespec.transport.discovery import Peer, route_address
from homespec.transport.keys import KeyPair, fingerprint, load_or_create, trusted_workers

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
INFO_MAX_BYTES = 64 << 10  # a worker's info message (its name, key and host profile) is a few KiB


@dataclass
class WorkerLink:
    """An open, authenticated connection to one worker."""

    peer: Peer
    info: WorkerInfo
    sock: Any  # DEALER, Curve client

    @property
    def key(self) -> str:
        return self.info.key

    def host_profile(self) -> Any:
        import json

        from homespec.profiling.profile import parse_profile

        try:
            return parse_profile({"hosts": [json.loads(self.info.profile)]}).hosts[0]
        except (ValueError, KeyError, TypeError) as exc:
            raise TransportError(f"worker {self.peer.name} sent a malformed profile: {exc}") from exc

    def request(self, msg: Any, timeout_s: float) -> Any:
        """Send ``msg`` and return the next message the worker sends back (heartbeat replies skipped)."""
        try:
            self.sock.send_multipart(encode(msg), copy=False)  # bounded: the link's SNDTIMEO
        except zmq.Again as exc:
            raise PeerLostError(
                f"worker {self.peer.name} at {self.peer.address}:{self.peer.port} takes nothing"
            ) from exc
        deadline = time.monotonic() + timeout_s
        while self.sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            reply = decode(self.sock.recv_multipart(copy=False))
            if not isinstance(reply, Heartbeat):
                return reply
            if time.monotonic() >= deadline:
                break
        raise PeerLostError(f"worker {self.peer.name} at {self.peer.address}:{self.peer.port} did not answer in time")


def fetch_info(peer: Peer, timeout_s: float = CONNECT_TIMEOUT_S) -> WorkerInfo:
    """What a worker's plain info port (control port + 1) says about it: its name, key (a claim) and devices. The
    port speaks plain TCP: it writes one framed message (``transport.codec.pack_frames``) and closes."""
    import socket

    from homespec.transport.codec import unpack_frames

    try:
        with socket.create_connection((peer.address, peer.port + 1), timeout=timeout_s) as conn:
            data = bytearray()
            while len(data) <= INFO_MAX_BYTES:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        raise PeerLostError(
            f"no worker answers at {peer.address}:{peer.port} (info port {peer.port + 1}): {exc}",
            hint="is `homespec worker` running there, and are ports 7650-7660 open?",
        ) from exc
    info = decode(unpack_frames(bytes(data)))
    if not isinstance(info, WorkerInfo):
        raise TransportError(f"{peer.address}:{peer.port + 1} answered with a {type(info).__name__}")
    return info


def answers(peer: Peer, trusted: Collection[str], timeout_s: float = 0.5) -> bool:
    """Whether a worker answers on its info port now, claiming a key this head trusts for it."""
    try:
        info = fetch_info(peer, timeout_s)
    except (PeerLostError, TransportError):
        return False
    return info.key == peer.key if peer.pinned else info.key in trusted


def trusted_key(peer: Peer, trusted: Collection[str]) -> str:
    """The key to open ``peer`` with: the pinned one, or the one it claims (advert, info port) if the user trusts
    it; UntrustedPeerError otherwise (nothing is sent to it)."""
    if peer.pinned:
        return peer.key
    name, key = peer.name, peer.key
    if not key:
        info = fetch_info(peer)
        name, key = info.name, info.key
    if key not in trusted:
        raise UntrustedPeerError(
            f"worker {name} at {peer.address}:{peer.port} has a key this head does not trust: {key} "
            f"(fingerprint {fingerprint(key)})",
            key,
            hint=f"if `homespec worker` there printed that fingerprint, run: homespec keys trust-worker -- "
            f"{shlex.quote(key)}; or pin it: --workers {shlex.quote(f'{peer.address}:{peer.port}@{key}')}",
            name=name,
        )
    return key


def connect(
    ctx: Any, keys: KeyPair, peer: Peer, measure: bool = False, trusted: Collection[str] | None = None
) -> WorkerLink:
    """An authenticated link to ``peer`` and its WorkerInfo (measured devices when ``measure``), if its key is
    trusted (``trusted``: default this machine's ``trusted_workers``)."""
    key = trusted_key(peer, trusted_workers() if trusted is None else trusted)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, int(CONNECT_TIMEOUT_S * 1000))  # a link whose peer went away never blocks a send
    curve_client(sock, keys, key)
    watch = HandshakeWatch(sock)
    sock.connect(peer.endpoint)
    state = watch.wait(CONNECT_TIMEOUT_S)
    watch.close()
    if state != "connected":
        sock.close(linger=0)
        if state == "refused":
            raise PeerLostError(
                f"worker {peer.name} at {peer.address}:{peer.port} refused this head's key",
                hint=f"on that machine run: homespec keys trust -- {shlex.quote(keys.public)}",
            )
        raise PeerLostError(f"worker {peer.name} at {peer.address}:{peer.port} did not answer in time")
    link = WorkerLink(peer, WorkerInfo("", key, peer.port, (), "{}"), sock)
    info = link.request(Hello(measure=measure), timeout_s=120.0 if measure else CONNECT_TIMEOUT_S)
    if not isinstance(info, WorkerInfo) or info.key != key:
        sock.close(linger=0)
        raise TransportError(f"worker {peer.name} answered Hello with {type(info).__name__}")
    link.info = info
    return link


@dataclass(frozen=True)
class Placement:
    """One stage of a remote plan: which worker, which of its devices (slot), which layers."""

    link: WorkerLink
    slot: int
    layers: tuple[int, int]

    @property
    def device(self) -> str:
        return self.link.info.devices[self.slot]


def placements(links: Sequence[WorkerLink], chain: Sequence[tuple[Device, tuple[int, int]]]) -> list[Placement]:
    """A plan's chain (planner devices, named by their worker's name and torch device) as Placements."""
    by_name = {link.info.name: link for link in links}
    out = []
    for device, layers in chain:
        link = by_name[device.host]
        out.append(Placement(link, link.info.devices.index(device.torch_device), layers))
    return out


class RemoteCluster(Cluster):
    def __init__(
        self,
        stages: Sequence[Placement],
        model: str,
        dtype: str,
        max_context: int,
        max_tree: int = DEFAULT_MAX_TREE,
        model_digest: str = "",
        keys: KeyPair | None = None,
        progress: Callable[[str], None] | None = None,
        timeout_s: float = PEER_TIMEOUT_S,
        max_requests: int = 8,
        weights: str = "auto",
        taps: str = "",
    ) -> None:
        """Deploy one stage per Placement and wait until every stage has loaded (``taps``: Assign.taps)."""
        num = len(stages)
        deploys = [
            Deploy(i, num, model, p.layers[0], p.layers[1], dtype, p.device, max_context, max_tree,
                   model_digest=model_digest, max_requests=max_requests, weights=weights, taps=taps)
            for i, p in enumerate(stages)
        ]  # fmt: skip
        super().__init__(deploys, progress, timeout_s)
        self.placements = list(stages)
        self.keys = keys or load_or_create("head")
        self.session = int(time.time() * 1000) & 0x7FFFFFFF
        self.links = list({id(p.link): p.link for p in stages}.values())
        worker_keys = frozenset(link.key for link in self.links)
        self.gatekeeper = Gatekeeper(self.ctx)  # shared with any other cluster of this process: a domain of its own
        domain = f"cluster-{self.session}-{id(self)}"
        self.gatekeeper.allow(domain, lambda: worker_keys)

        def server(sock: Any) -> Any:
            return curve_server(sock, self.keys, domain)

        self.results = self._bind(zmq.PULL, "tcp://0.0.0.0:*", server)
        self.report = self._bind(zmq.PULL, "tcp://0.0.0.0:*", server)
        self.control = self._bind(zmq.PUB, "tcp://0.0.0.0:*", server)
        self.lost: str | None = None
        self.missing: list[Peer] = []  # workers that did not answer when this cluster was built
        self.spec: RemoteSpec | None = None  # how the workers were named (for ``outdated``)
        self._closed = False
        self._lock = threading.Lock()  # the workers' DEALER sockets: the heartbeat thread's after deploying
        self._deploy(deploys)
        first_key = self.placements[0].link.key
        self._connect_first(self._input(0), lambda sock: curve_client(sock, self.keys, first_key))
        self._pinger = threading.Thread(target=self._heartbeats, name="homespec-heartbeats", daemon=True)
        self._pinger.start()
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _port_of(self, sock: Any) -> int:
        return int(sock.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1])

    def _input(self, i: int) -> str:
        p = self.placements[i]
        return f"tcp://{p.link.peer.address}:{p.link.info.port + 2 + p.slot}"

    def _deploy(self, deploys: Sequence[Deploy]) -> None:
        from dataclasses import replace

        for i, (d, p) in enumerate(zip(deploys, self.placements, strict=True)):
            back = route_address(p.link.peer.address)  # where this worker reaches the head
            last = i + 1 == len(deploys)
            wired = replace(
                d,
                session=self.session,
                slot=p.slot,
                next_address=f"tcp://{back}:{self._port_of(self.results)}" if last else self._input(i + 1),
                next_key=self.keys.public if last else self.placements[i + 1].link.key,
                upstream_key=self.keys.public if i == 0 else self.placements[i - 1].link.key,
                control_address=f"tcp://{back}:{self._port_of(self.control)}",
                report_address=f"tcp://{back}:{self._port_of(self.report)}",
                head_key=self.keys.public,
            )
            reply = p.link.request(wired, timeout_s=CONNECT_TIMEOUT_S)
            if isinstance(reply, Failure):
                self.close()
                raise PeerLostError(f"worker {p.link.info.name} refused stage {i}: {reply.message}")
            if not isinstance(reply, Deployed) or reply.stage != i:
                self.close()
                raise TransportError(f"worker {p.link.info.name} answered Deploy with {type(reply).__name__}")
            self._progress(
                f"stage {i + 1} starting on {p.link.info.name} {p.device} (layers {d.layer_start}-{d.layer_end - 1})"
            )

    # -- liveness ------------------------------------------------------------------------------------------------
    def _heartbeats(self) -> None:
        """Thread: a Heartbeat to every worker each second; what they say back (a stage process that died) and how
        long each has been silent decide ``lost``."""
        heard = {id(link): time.monotonic() for link in self.links}
        seq = itertools.count()
        while not self._closed:
            with self._lock:
                if self._closed:
                    return
                for link in self.links:
                    with contextlib.suppress(zmq.Again):  # a full or torn-down link: its silence is counted below
                        link.sock.send_multipart(encode(Heartbeat(-1, next(seq))), copy=False, flags=zmq.NOBLOCK)
                end = time.monotonic() + PING_EVERY_S
                while time.monotonic() < end and not self._closed:
                    for link in self.links:
                        while link.sock.poll(0):
                            heard[id(link)] = time.monotonic()
                            self._on_worker(link, link.sock.recv_multipart(copy=False))
                    time.sleep(0.05)
            for link in self.links:
                silent = time.monotonic() - heard[id(link)]
                if silent > self.timeout_s and self.lost is None:
                    self.lost = f"worker {link.info.name} at {link.peer.address} has been silent for {silent:.0f} s"

    def _on_worker(self, link: WorkerLink, frames: list[Any]) -> None:
        try:
            msg = decode(frames)
        except TransportError as exc:
            log.warning("dropped a malformed message from worker %s: %s", link.info.name, exc)
            return
        if isinstance(msg, Failure) and self.lost is None:
            self.lost = f"{self.stage_name(msg.stage)} on worker {link.info.name}: {msg.message}"

    def check_alive(self) -> None:
        if self.lost is not None:
            raise PeerLostError(self.lost, hint="the request was cancelled; the next one rebuilds the cluster")
        self.check_heard()

    def outdated(self) -> bool:
        """A worker this cluster lacks answers now: one that was missing when it was built, or (``--workers auto``)
        a new one on the LAN. Worth rebuilding for, between requests (re-admission)."""
        trusted = trusted_workers()
        if self.spec is not None and self.spec.workers == ("auto",):
            from homespec.transport.discovery import browse

            serving = {link.key for link in self.links}
            return any(p.key in trusted and p.key not in serving for p in browse(1.0))  # adverts of others: no
        return any(answers(p, trusted) for p in self.missing)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            for link in self.links:
                with contextlib.suppress(zmq.ZMQError):
                    link.sock.send_multipart(
                        encode(Release(self.session, "head closing")), copy=False, flags=zmq.NOBLOCK
                    )
        for sock in (self.control,):
            with contextlib.suppress(zmq.ZMQError):
                sock.send_multipart(encode(Shutdown("head closing")), copy=False)
        time.sleep(0.05)  # let the Release go out before the sockets close
        for sock in (self.results, self.report, self.control, self.first):
            if sock is not None:
                sock.close(linger=0)
        for link in self.links:
            link.sock.close(linger=100)
        self.gatekeeper.stop()


@dataclass(frozen=True)
class RemoteSpec:
    """Where a remote cluster's stages go: workers by address (``--workers``; ``auto`` browses the LAN) or a profile
    (``--cluster``, as written by ``homespec profile --lan``, whose figures and links the plan uses)."""

    workers: tuple[str, ...] = ()
    profile: str | None = None
    stages: int | None = None  # exactly this many stages (None: the planner chooses)


def build(
    spec: RemoteSpec,
    model: str,
    shape: Any,
    dtype: str,
    mode: str,
    max_context: int,
    progress: Callable[[str], None] | None = None,
    model_digest: str = "",
    timeout_s: float = PEER_TIMEOUT_S,
    max_requests: int = 8,
    weights: str = "auto",
    taps: str = "",
) -> tuple[RemoteCluster, Any]:
    """Connect to the workers, plan ``shape`` on their devices (minimizing ``mode``'s modeled TBT), deploy it; returns
    the cluster and the plan."""
    from homespec.profiling.profile import load_profile

    say = progress or (lambda text: None)
    ctx: zmq.Context[Any] = zmq.Context.instance()
    keys = load_or_create("head")
    profile = load_profile(spec.profile) if spec.profile else None
    links: list[WorkerLink] = []
    missing: list[Peer] = []
    try:
        links, missing = _connect_all(ctx, keys, find_peers(spec, profile, say), profile is None,
                                      spec.workers == ("auto",), say)  # fmt: skip
        if profile is not None:
            answering = {(link.peer.address, link.peer.port) for link in links}
            profile = profile.only_hosts(lambda h: (h.address, h.port) in answering)
        try:
            the_plan = plan_on(links, profile, shape, dtype, mode, max_context, spec.stages, weights)
        except PlanError:
            if not (missing and spec.stages):
                raise
            # --stages asked for more than the devices left can give: serve on what answers rather than not at all
            say(f"{len(missing)} worker(s) missing: {spec.stages} stages do not fit the rest, the planner chooses")
            the_plan = plan_on(links, profile, shape, dtype, mode, max_context, None, weights)
        chain = [(s.device, s.layers) for s in the_plan.stages]
        used = {d.host for d, _ in chain}
        for link in links:
            if link.info.name not in used:
                link.sock.close(linger=0)
        cluster = RemoteCluster(
            placements(links, chain), model, dtype, max_context, model_digest=model_digest, keys=keys, progress=say,
            timeout_s=timeout_s, max_requests=max_requests, weights=weights, taps=taps,
        )  # fmt: skip
        cluster.missing = missing
        cluster.spec = spec
    except BaseException:
        for link in links:
            link.sock.close(linger=0)
        raise
    return cluster, the_plan


def _connect_all(
    ctx: Any, keys: KeyPair, peers: Sequence[Peer], measure: bool, browsed: bool, say: Callable[[str], None]
) -> tuple[list[WorkerLink], list[Peer]]:
    """Links to the trusted workers among ``peers`` and the ones that did not answer. A peer the user named with an
    untrusted key is an error; one found on the LAN (``browsed``) is skipped with a warning, and so is a peer that
    misbehaves or repeats a key or name already connected: none of them stops the build."""
    trusted = trusted_workers()
    links: list[WorkerLink] = []
    missing: list[Peer] = []
    untrusted: list[UntrustedPeerError] = []
    for peer in peers:
        say(f"connecting to worker {peer.name} at {peer.address}:{peer.port}…")
        try:
            link = connect(ctx, keys, peer, measure=measure, trusted=trusted)
        except UntrustedPeerError as exc:
            if not browsed:
                raise
            say(f"warning: skipped {exc.message}")
            untrusted.append(exc)
            continue
        except TransportError as exc:
            say(f"warning: skipped worker {peer.name} at {peer.address}:{peer.port}: {exc.message}")
            continue
        except PeerLostError as exc:
            if "refused this head's key" in exc.message:
                raise  # not a lost device: the user has to trust this head there
            say(f"worker {peer.name} is not answering ({exc.message}): planning without it")
            missing.append(peer)
            continue
        twin = next((x for x in links if x.key == link.key or x.info.name == link.info.name), None)
        if twin is not None:
            say(f"warning: skipped worker {link.info.name} at {peer.address}:{peer.port}: the same key or name as "
                f"the one at {twin.peer.address}:{twin.peer.port}")  # fmt: skip
            link.sock.close(linger=0)
            continue
        links.append(link)
    if not links and untrusted:
        keys_seen = "; ".join(f"{e.key} ({fingerprint(e.key)})" for e in untrusted)
        raise UntrustedPeerError(
            f"no trusted worker answered; {len(untrusted)} untrusted: {keys_seen}",
            untrusted[0].key,
            hint="compare each fingerprint with what `homespec worker` printed there, then: homespec keys "
            "trust-worker -- 'KEY'",
        )
    if not links:
        raise PeerLostError(f"none of the {len(missing)} workers answered", hint="is `homespec worker` running?")
    return links, missing


def find_peers(spec: RemoteSpec, profile: Any, say: Callable[[str], None]) -> list[Peer]:
    """The workers to connect to: the profile's (its hosts that run one; this machine's own devices serve only
    through a worker of its own), the LAN's (``auto``), or the addresses given."""
    from homespec.transport.discovery import browse, parse_peer

    if profile is not None:
        workers = [h for h in profile.hosts if h.address]
        if not workers:
            raise ConfigError(
                f"profile {spec.profile} names no workers", hint="write one with `homespec profile --lan`"
            )
        return [Peer(h.name, h.address, h.port, h.key, pinned=bool(h.key)) for h in workers]  # saved by the user
    if spec.workers == ("auto",):
        say("looking for workers on the LAN…")
        peers = browse()
        if not peers:
            raise PeerLostError("no worker answered on the LAN", hint="start `homespec worker`, or give --workers")
        return peers
    return [parse_peer(w) for w in spec.workers]


def plan_on(
    links: Sequence[WorkerLink],
    profile: Any,
    shape: Any,
    dtype: str,
    mode: str,
    max_context: int,
    stages: int | None,
    weights: str = "auto",
) -> Any:
    """The planner's placement over the connected workers: with the profile's figures and links when there is one
    (its hosts must carry the names the workers give themselves), else with what the workers measured just now."""
    from homespec.core.planner import PlanOptions, plan
    from homespec.profiling.local import host_name
    from homespec.profiling.profile import ClusterProfile

    if profile is None:
        profile = ClusterProfile("workers", tuple(link.host_profile() for link in links), head=host_name())
    else:
        for link in links:
            h = next(h for h in profile.hosts if (h.address, h.port) == (link.peer.address, link.peer.port))
            if h.name != link.info.name:
                raise ConfigError(
                    f"profile {profile.name} calls the worker at {h.address}:{h.port} {h.name!r}, it calls itself "
                    f"{link.info.name!r}",
                    hint="measure the profile again with `homespec profile --lan`",
                )
    fmt = weights if weights in ("int4", "int8") else dtype
    opts = PlanOptions(weights=fmt, act=dtype, context=max_context, mode=mode if mode != "ar" else "pp", stages=stages)
    return plan(shape, profile.topology(fmt), opts)
