"""The workers on the LAN as part of a profile (``homespec profile --lan``, ``--peer``): each worker's devices as it
measures them itself, and the link from this head to it measured over the real transport (CurveZMQ, the worker's
control socket): latency from round trips of a small Echo, bandwidth from round trips of a large one.

Only trusted workers are measured and written into the profile (DESIGN §7): a worker whose key this head does not
trust (``homespec keys trust-worker``, or ``--peer HOST:PORT@KEY``) is listed with its key and fingerprint and left
out, unless the user confirms it when asked (``confirm``), which adds it to ``trusted_workers``. A saved profile's
keys are therefore keys the user vouched for, and ``--cluster PROFILE`` deploys to them.

Links between two workers are not measured (a worker talks only to trusted heads); the profile's default link
between hosts becomes the slowest measured one, which the planner uses for every pair it has no figure for.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from homespec.core.messages import Echo, RawTensor
from homespec.errors import TransportError
from homespec.profiling.profile import ClusterProfile, LinkProfile

PINGS = 30
SMALL = 64  # bytes
LARGE = 1 << 20  # bytes, grown until a round trip is long enough to time
LONG_ENOUGH_S = 0.05


def add_workers(
    cluster: ClusterProfile,
    browse_s: float,
    peers: list[str],
    progress: Callable[[str], None] | None = None,
    confirm: Callable[[Any, str], bool] | None = None,
) -> tuple[ClusterProfile, list[tuple[Any, str]]]:
    """Find the workers (zeroconf for ``browse_s`` seconds, plus ``peers``), ask each trusted one to measure its
    devices, measure the link to each, and return ``cluster`` (this machine's profile) with them added, and the
    untrusted ones, (peer, the key it claims), that ``confirm(peer, key)`` (when given) did not accept."""
    import zmq

    from homespec.errors import UntrustedPeerError
    from homespec.pipeline.remote import connect, trusted_key
    from homespec.transport.discovery import browse, parse_peer
    from homespec.transport.keys import TRUSTED_WORKERS, load_or_create, trust, trusted_workers

    say = progress or (lambda text: None)
    found = browse(browse_s) if browse_s > 0 else []
    say(f"{len(found)} worker(s) answered on the LAN")
    known = {(p.address, p.port) for p in found}
    found += [p for p in map(parse_peer, peers) if (p.address, p.port) not in known]
    ctx: zmq.Context[Any] = zmq.Context.instance()
    keys = load_or_create("head")
    head = cluster.head or cluster.hosts[0].name
    untrusted: list[tuple[Any, str]] = []
    for peer in found:
        try:
            trusted_key(peer, trusted_workers())
        except UntrustedPeerError as exc:
            peer = replace(peer, name=exc.name or peer.name)  # the name it gives itself
            if confirm is None or not confirm(peer, exc.key):
                untrusted.append((peer, exc.key))
                continue
            trust(exc.key, peer.name, list_name=TRUSTED_WORKERS)
        except TransportError as exc:
            say(f"warning: skipped {peer.name} at {peer.address}:{peer.port}: {exc.message}")
            continue
        say(f"measuring worker {peer.name} at {peer.address}:{peer.port}…")
        link = connect(ctx, keys, peer, measure=True)
        try:
            host = replace(link.host_profile(), address=peer.address, port=peer.port, key=link.key)
            latency, p90, mb_s = measure_link(link.sock)
            cluster = cluster.with_host(host, LinkProfile(head, host.name, latency, p90, mb_s))
        finally:
            link.sock.close(linger=0)
    return cluster, untrusted


def measure_link(sock: Any) -> tuple[float, float, float]:
    """(one-way latency ms median, p90, MB/s) to the worker behind ``sock`` (a connected DEALER)."""
    rtts = [round_trip(sock, SMALL, i) for i in range(PINGS)]
    base = statistics.median(rtts)
    size, took = LARGE, 0.0
    while True:
        took = min(round_trip(sock, size, PINGS + i) for i in range(3))
        if took - base > LONG_ENOUGH_S or size >= 64 << 20:
            break
        size *= 4
    q = statistics.quantiles(rtts, n=10)
    mb_s = 2 * size / max(took - base, 1e-6) / 1e6  # the payload went there and back
    return round(base / 2 * 1e3, 4), round(q[-1] / 2 * 1e3, 4), round(mb_s, 2)


def round_trip(sock: Any, size: int, seq: int, timeout_s: float = 30.0) -> float:
    from homespec.transport.codec import decode, encode

    payload = RawTensor("uint8", (size,), bytes(size))
    start = time.perf_counter()
    sock.send_multipart(encode(Echo(seq, payload)), copy=False)
    deadline = start + timeout_s
    while sock.poll(max(1, int((deadline - time.perf_counter()) * 1000))):
        msg = decode(sock.recv_multipart(copy=False))
        if isinstance(msg, Echo) and msg.seq == seq:
            return time.perf_counter() - start
    raise TransportError(f"no echo of {size} bytes within {timeout_s:.0f} s")
