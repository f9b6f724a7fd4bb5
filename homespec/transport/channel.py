"""Sockets beyond loopback: CurveZMQ on every one, a ZAP gate that admits only the keys each domain allows, and a
check that tells "the server refused our key" apart from "nobody answers" (DESIGN §7).

A bound socket is a Curve *server* with this process's secret key and a ZAP domain; a connecting socket is a Curve
*client* that must know the server's public key. The gate runs libzmq's ZAP protocol in a thread (pyzmq's
``ThreadAuthenticator``): a peer whose key its domain does not allow is refused during the handshake, before a
single message of it is read — the refusal is counted, nothing is parsed. Loopback-only local stages (``ipc://``)
do not use this module.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from homespec.errors import HomespecError
from homespec.transport.keys import KeyPair

log = logging.getLogger(__name__)

KeySource = Callable[[], Collection[str]]


class KeyGate:
    """ZAP credentials provider: per domain a function giving the public keys it admits (asked at every handshake,
    so a trust list can change while the socket is bound). Counts refusals per domain."""

    def __init__(self) -> None:
        self.domains: dict[str, KeySource] = {}
        self.refused: dict[str, int] = {}
        self.admitted: dict[str, int] = {}
        self._lock = threading.Lock()

    def callback(self, domain: str, key: bytes) -> bool:
        source = self.domains.get(domain)
        try:
            ok = source is not None and key.decode("ascii", "replace") in source()
        except HomespecError as exc:  # a trust list that cannot be used (e.g. others can write it) admits nobody
            log.error("refused a peer on %s: %s (%s)", domain, exc.message, exc.hint or "")
            ok = False
        with self._lock:
            counts = self.admitted if ok else self.refused
            counts[domain] = counts.get(domain, 0) + 1
        if not ok:
            log.warning("refused a peer with key %s on %s", key[:8].decode("ascii", "replace"), domain)
        return ok


class _SharedAuth:
    """A context's one ZAP handler and its KeyGate, with how many Gatekeepers use them."""

    def __init__(self, ctx: Any) -> None:
        self.ctx, self.gate, self.users = ctx, KeyGate(), 0
        self.auth = ThreadAuthenticator(ctx, log=logging.getLogger("homespec.zap"))
        self.auth.start()


_SHARED: dict[int, _SharedAuth] = {}  # by id(ctx)
_SHARED_LOCK = threading.Lock()


class Gatekeeper:
    """A handle on its ZeroMQ context's ZAP handler (libzmq allows one per context: the first handle starts it, the
    last ``stop`` ends it), so that two clusters in one process (two engines, a head and its tests) share it. Each
    handle's domains are its own: allowing a domain another handle holds is refused, and ``stop`` removes them."""

    def __init__(self, ctx: Any) -> None:
        with _SHARED_LOCK:
            shared = _SHARED.get(id(ctx))
            if shared is None or shared.ctx is not ctx:
                shared = _SHARED[id(ctx)] = _SharedAuth(ctx)
            shared.users += 1
        self._shared, self.gate = shared, shared.gate
        self._domains: list[str] = []
        self._stopped = False

    def allow(self, domain: str, keys: KeySource) -> None:
        with _SHARED_LOCK:
            if domain in self.gate.domains and domain not in self._domains:
                raise ValueError(f"ZAP domain {domain!r} is another gatekeeper's in this context")
            self.gate.domains[domain] = keys
            self._domains.append(domain)
            self._shared.auth.configure_curve_callback(domain, credentials_provider=self.gate)

    def stop(self) -> None:
        with _SHARED_LOCK:
            if self._stopped:
                return
            self._stopped = True
            for domain in self._domains:
                self.gate.domains.pop(domain, None)
            self._shared.users -= 1
            if self._shared.users == 0:
                self._shared.auth.stop()
                if _SHARED.get(id(self._shared.ctx)) is self._shared:
                    del _SHARED[id(self._shared.ctx)]


def curve_server(sock: Any, keys: KeyPair, domain: str) -> Any:
    """Make ``sock`` (before bind) a Curve server of ``domain``."""
    sock.curve_server = True
    sock.curve_secretkey = keys.secret.encode()
    sock.curve_publickey = keys.public.encode()
    sock.zap_domain = domain.encode()
    return sock


def curve_client(sock: Any, keys: KeyPair, server_key: str) -> Any:
    """Make ``sock`` (before connect) a Curve client of the server whose public key is ``server_key``."""
    sock.curve_secretkey = keys.secret.encode()
    sock.curve_publickey = keys.public.encode()
    sock.curve_serverkey = server_key.encode()
    return sock


class HandshakeWatch:
    """Watches a connecting socket's Curve handshakes (call before ``connect``): ``wait`` says whether the server
    admitted this key, refused it (its ZAP gate, or a wrong server key), or has not answered yet."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        )
        self.state = "silent"  # connected | refused | silent

    def wait(self, seconds: float) -> str:
        from zmq.utils.monitor import recv_monitor_message

        end = time.monotonic() + seconds
        while self.state == "silent":
            left = end - time.monotonic()
            if left <= 0 or not self._monitor.poll(int(left * 1000)):
                break
            event = recv_monitor_message(self._monitor)["event"]
            self.state = "connected" if event == zmq.EVENT_HANDSHAKE_SUCCEEDED else "refused"
        return self.state

    def close(self) -> None:
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
