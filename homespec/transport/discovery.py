"""Finding workers: zeroconf (mDNS/DNS-SD) adverts of ``_homespec._tcp.local.``, and manual peers for networks where
multicast does not reach (``--peer HOST:PORT``).

An advert carries what a head needs to open a CurveZMQ connection: the worker's name, its address and control port,
and its public key (TXT ``key``); nothing secret, and nothing trusted: anyone on the LAN can advertise anything. A
key from an advert (or a worker's plain info port) is a claim; the head deploys only to keys the user trusts
(``Peer.pinned``, ``trusted_workers``; pipeline/remote.py), and the CurveZMQ handshake proves the worker holds it.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

from homespec.core.messages import PROTOCOL_VERSION
from homespec.errors import ConfigError

log = logging.getLogger(__name__)

SERVICE = "_homespec._tcp.local."
DEFAULT_PORT = 7650


@dataclass(frozen=True)
class Peer:
    name: str
    address: str
    port: int
    key: str = ""  # from the advert (a claim), or pinned by the user (HOST:PORT@KEY, a saved profile)
    pinned: bool = False  # the user gave this key: trusted without the trusted_workers list

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.address}:{self.port}"


def parse_peer(text: str) -> Peer:
    """``HOST[:PORT][@KEY]`` (the default port 7650; KEY pins the worker's public key instead of asking its info
    port), the host name resolved now."""
    text, _, key = text.strip().partition("@")
    if key:
        from homespec.transport.keys import check_key

        key = check_key(key)
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        host, port = text.strip(), str(DEFAULT_PORT)
    number = int(port) if port.isdigit() else -1
    if not host or not (1 <= number <= 65535):
        raise ConfigError(f"not a worker address: {text!r}", hint="give HOST:PORT, e.g. 192.168.1.20:7650")
    try:
        address = socket.gethostbyname(host)
    except OSError as exc:
        raise ConfigError(f"cannot resolve worker host {host!r}: {exc}") from exc
    return Peer(host, address, number, key, pinned=bool(key))


def local_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback."""
    import psutil

    out = []
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                out.append(a.address)
    return out


def route_address(remote: str) -> str:
    """The local address this machine uses to reach ``remote`` (where a worker should connect back to the head)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((remote, 9))  # UDP: no packet is sent; the kernel picks the route
        return str(probe.getsockname()[0])
    finally:
        probe.close()


class Advertiser:
    """Advertise this worker on the LAN until ``close``."""

    def __init__(self, name: str, port: int, key: str, addresses: list[str] | None = None) -> None:
        from zeroconf import IPVersion, ServiceInfo, Zeroconf

        self.addresses = addresses or local_addresses()
        self._zc = Zeroconf(ip_version=IPVersion.V4Only)
        label = "".join(c if c.isalnum() or c == "-" else "-" for c in name)[:50] or "worker"
        self._info = ServiceInfo(
            SERVICE,
            f"{label}.{SERVICE}",
            addresses=[socket.inet_aton(a) for a in self.addresses],
            port=port,
            properties={"name": name, "key": key, "v": str(PROTOCOL_VERSION)},
            server=f"{label}.local.",
        )
        self._zc.register_service(self._info, allow_name_change=True)

    def close(self) -> None:
        self._zc.unregister_service(self._info)
        self._zc.close()


def browse(seconds: float = 3.0) -> list[Peer]:
    """Workers that answer on the LAN within ``seconds`` (of this protocol version), by name."""
    from zeroconf import IPVersion, ServiceBrowser, ServiceListener, Zeroconf

    found: dict[str, Peer] = {}

    class Listener(ServiceListener):
        def add_service(self, zc: Any, type_: str, name: str) -> None:
            info = zc.get_service_info(type_, name, timeout=int(max(seconds, 1) * 1000))
            if info is None:
                return
            props = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
            addresses = info.parsed_addresses(IPVersion.V4Only)
            if props.get("v") != str(PROTOCOL_VERSION) or not addresses:
                log.info("ignoring %s (protocol %s)", name, props.get("v"))
                return
            found[name] = Peer(
                props.get("name", name), addresses[0], int(info.port or DEFAULT_PORT), props.get("key", "")
            )

        def update_service(self, zc: Any, type_: str, name: str) -> None:
            self.add_service(zc, type_, name)

        def remove_service(self, zc: Any, type_: str, name: str) -> None:
            found.pop(name, None)

    zc = Zeroconf(ip_version=IPVersion.V4Only)
    try:
        ServiceBrowser(zc, SERVICE, Listener())
        time.sleep(seconds)
    finally:
        zc.close()
    return sorted(found.values(), key=lambda p: p.name)
