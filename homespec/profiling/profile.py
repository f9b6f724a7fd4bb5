"""Profile files (``profiles/*.json``, schema documented in ``profiles/README.md``): what hosts, devices and links a
cluster has, as measured by ``homespec profile`` or written by hand for an emulated cluster.

A profile is data: hosts (name, address, port, public key), their devices (kind, index, name, memory total and free,
memory bandwidth, FLOP/s per dtype) and links (defaults for inside a host and between hosts, plus measured pairs).
An emulation profile (``--emulate``) also names the model it emulates (``emulated_model``) and the stage overhead and
compute efficiency of its time model. This module is the one reader of every profile file; it reads and writes them
and turns them into the planner's ``Topology``; it measures nothing. Profiles are frozen: a measurement makes a new
one (``dataclasses.replace``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from homespec.core.planner import GB, Device, Link, Topology
from homespec.errors import ConfigError

SCHEMA = 1

#: The FLOP/s a device's dtype figure is read from, per plan weight format (quantized weights compute in fp16).
COMPUTE_DTYPE = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "int8": "fp16", "int4": "fp16"}


@dataclass(frozen=True)
class DeviceProfile:
    kind: str  # cuda | mps | cpu
    index: int
    name: str
    memory_gb: float  # total
    memory_free_gb: float  # what the plan may use (before its headroom)
    mem_bw_gb_s: float  # measured (or from the spec sheet, in hand-written profiles)
    tflops: dict[str, float] = field(default_factory=dict)  # per dtype: fp32, fp16, bf16
    utilization: float | None = None  # percent busy when measured (NVML)
    extra: dict[str, Any] = field(default_factory=dict)  # anything else measured (cores, compute capability…)

    def flops(self, dtype: str) -> float:
        """FLOP/s at ``dtype``: the measured figure, else the best measured one (a device without fp16 figures)."""
        value = self.tflops.get(dtype) or max(self.tflops.values(), default=0.0)
        if value <= 0:
            raise ConfigError(f"device {self.name} has no FLOP/s figure", hint="run `homespec profile` on its host")
        return value * 1e12


@dataclass(frozen=True)
class LinkProfile:
    a: str  # host names; a link is symmetric
    b: str
    latency_ms: float  # median round trip / 2
    latency_p90_ms: float
    mb_per_s: float

    def link(self) -> Link:
        return Link(self.latency_ms / 1e3, self.mb_per_s * 1e6)


@dataclass(frozen=True)
class HostProfile:
    name: str
    devices: tuple[DeviceProfile, ...]
    address: str = ""  # where its worker listens (empty: this machine)
    port: int = 0
    key: str = ""  # its worker's CurveZMQ public key (z85)
    os: str = ""


@dataclass(frozen=True)
class EmulatedModel:
    """The model an emulation profile's clock models (``emulated_model``): its size, not its shape."""

    name: str
    layers: int
    hidden_size: int
    bytes_per_param: float
    params_per_layer: int


@dataclass(frozen=True)
class ClusterProfile:
    name: str
    hosts: tuple[HostProfile, ...]
    links: tuple[LinkProfile, ...] = ()
    intra_host: Link = Link(20e-6, 12e9)
    inter_host: Link = Link(0.5e-3, 117e6)
    head: str = ""  # the host the head runs on (default: the first)
    description: str = ""
    measured_at: str = ""
    emulated: EmulatedModel | None = None  # emulation profiles only
    overhead_ms: float = 0.5  # the time model's fixed cost of a stage step (core/planner.py)
    compute_efficiency: float = 0.5  # the achieved share of peak FLOP/s

    def only_hosts(self, keep: Callable[[HostProfile], bool]) -> ClusterProfile:
        """This profile with only the hosts ``keep`` accepts."""
        return replace(self, hosts=tuple(h for h in self.hosts if keep(h)))

    def with_host(self, host: HostProfile, link: LinkProfile | None = None) -> ClusterProfile:
        """This profile with ``host`` added (replacing one of its name) and its measured ``link``; the default
        inter-host link becomes the slowest measured one."""
        links = self.links + ((link,) if link else ())
        inter = self.inter_host
        if links:
            inter = Link(max(x.latency_ms for x in links) / 1e3, min(x.mb_per_s for x in links) * 1e6)
        hosts = (*(h for h in self.hosts if h.name != host.name), host)
        return replace(self, hosts=hosts, links=links, inter_host=inter)

    def host(self, name: str) -> HostProfile:
        for h in self.hosts:
            if h.name == name:
                return h
        raise ConfigError(f"profile {self.name} has no host {name!r}")

    def topology(self, weights: str = "fp16") -> Topology:
        """The planner's view: every device with its free memory, bandwidth and FLOP/s at the weights' dtype."""
        dtype = COMPUTE_DTYPE[weights]
        devices = tuple(
            Device(h.name, d.name, d.kind, d.index, d.memory_free_gb * GB, d.mem_bw_gb_s * GB, d.flops(dtype))
            for h in self.hosts
            for d in h.devices
        )
        links = tuple((x.a, x.b, x.link()) for x in self.links)
        head = self.head or (self.hosts[0].name if self.hosts else "")
        return Topology(devices, head, self.intra_host, self.inter_host, links)

    def to_json(self) -> dict[str, Any]:
        def link(x: Link) -> dict[str, float]:
            return {"latency_ms": round(x.latency_s * 1e3, 4), "mb_per_s": round(x.bytes_per_s / 1e6, 1)}

        emulation: dict[str, Any] = {}
        if self.emulated is not None:
            emulation = {
                "emulated_model": asdict(self.emulated),
                "overhead_ms": self.overhead_ms,
                "compute_efficiency": self.compute_efficiency,
            }
        return {
            "schema": SCHEMA,
            "name": self.name,
            "description": self.description,
            "measured_at": self.measured_at,
            "head": self.head,
            "hosts": [asdict(h) for h in self.hosts],
            "links": {
                "intra_host": link(self.intra_host),
                "inter_host": link(self.inter_host),
                "measured": [asdict(x) for x in self.links],
            },
            **emulation,
        }


def load_profile(path: str | Path) -> ClusterProfile:
    """Read a profile file; ConfigError naming the file and the field when it is malformed."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"profile not found: {p}", hint="see profiles/README.md, or run `homespec profile --save`")
    try:
        return parse_profile(json.loads(p.read_text()), p.stem)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"profile {p} is not JSON: {exc}") from exc
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"profile {p} is malformed: {type(exc).__name__}: {exc}") from exc


def parse_profile(data: dict[str, Any], default_name: str = "profile") -> ClusterProfile:
    """A profile from its JSON (schema 1; the hand-written emulation profiles are read too: ``tflops`` as one number,
    ``memory_gb`` without ``memory_free_gb``)."""
    if int(data.get("schema", SCHEMA)) != SCHEMA:
        raise ValueError(f"schema {data['schema']}, this HomeSpec reads schema {SCHEMA}")
    hosts = []
    for h in data["hosts"]:
        devices = []
        for i, d in enumerate(h["devices"]):
            tflops = d["tflops"] if isinstance(d["tflops"], dict) else {k: float(d["tflops"]) for k in ("fp16", "bf16")}
            devices.append(
                DeviceProfile(
                    kind=str(d.get("kind", "cuda")),
                    index=int(d.get("index", i)),
                    name=str(d["name"]),
                    memory_gb=float(d["memory_gb"]),
                    memory_free_gb=float(d.get("memory_free_gb", d["memory_gb"])),
                    mem_bw_gb_s=float(d["mem_bw_gb_s"]),
                    tflops={str(k): float(v) for k, v in tflops.items()},
                    utilization=d.get("utilization"),
                    extra=dict(d.get("extra", {})),
                )
            )
        hosts.append(
            HostProfile(
                name=str(h["name"]),
                devices=tuple(devices),
                address=str(h.get("address", "")),
                port=int(h.get("port", 0)),
                key=str(h.get("key", "")),
                os=str(h.get("os", "")),
            )
        )
    links = data.get("links", {})
    measured = tuple(
        LinkProfile(
            a=str(x["a"]),
            b=str(x["b"]),
            latency_ms=float(x["latency_ms"]),
            latency_p90_ms=float(x.get("latency_p90_ms", x["latency_ms"])),
            mb_per_s=float(x["mb_per_s"]),
        )
        for x in links.get("measured", [])
    )
    em = data.get("emulated_model")
    emulated = None
    if em is not None:
        emulated = EmulatedModel(
            name=str(em.get("name", "")),
            layers=int(em["layers"]),
            hidden_size=int(em["hidden_size"]),
            bytes_per_param=float(em["bytes_per_param"]),
            params_per_layer=int(em["params_per_layer"]),
        )
    return ClusterProfile(
        name=str(data.get("name", default_name)),
        hosts=tuple(hosts),
        links=measured,
        intra_host=_link(links["intra_host"]) if "intra_host" in links else ClusterProfile.intra_host,
        inter_host=_link(links["inter_host"]) if "inter_host" in links else ClusterProfile.inter_host,
        head=str(data.get("head", "")),
        description=str(data.get("description", "")),
        measured_at=str(data.get("measured_at", "")),
        emulated=emulated,
        overhead_ms=float(data.get("overhead_ms", ClusterProfile.overhead_ms)),
        compute_efficiency=float(data.get("compute_efficiency", ClusterProfile.compute_efficiency)),
    )


def merge_profiles(profiles: list[ClusterProfile]) -> ClusterProfile:
    """Several profiles as one cluster (``--profile a.json --profile b.json``): hosts by name (a later file's host
    replaces an earlier one's), every measured link, the first file's defaults and head."""
    if len(profiles) == 1:
        return profiles[0]
    first = profiles[0]
    hosts: dict[str, HostProfile] = {}
    links: dict[frozenset[str], LinkProfile] = {}
    for p in profiles:
        hosts.update({h.name: h for h in p.hosts})
        links.update({frozenset((x.a, x.b)): x for x in p.links})
    name = "+".join(p.name for p in profiles)
    return replace(first, name=name, hosts=tuple(hosts.values()), links=tuple(links.values()))


def _link(d: dict[str, Any]) -> Link:
    return Link(float(d["latency_ms"]) / 1e3, float(d["mb_per_s"]) * 1e6)
