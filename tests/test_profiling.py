"""``homespec profile`` on this machine (CPU), the CUDA and MPS detection paths with stand-ins for the drivers
(no GPU here), and profile files: round trips, the checked-in profiles, merging."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from homespec.profiling.devices import cuda_devices, detect, mps_device
from homespec.profiling.profile import load_profile, merge_profiles, parse_profile

ROOT = Path(__file__).resolve().parents[1]
HOMESPEC = str(Path(sys.executable).parent / "homespec")


def test_profile_json_reports_this_cpu_with_measured_figures() -> None:
    out = subprocess.run([HOMESPEC, "profile", "--json", "--budget", "0.1"], capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    assert data["schema"] == 1 and len(data["hosts"]) == 1
    (cpu,) = [d for d in data["hosts"][0]["devices"] if d["kind"] == "cpu"]
    assert cpu["memory_gb"] > 1 and 0 < cpu["memory_free_gb"] <= cpu["memory_gb"]
    assert cpu["mem_bw_gb_s"] > 0.5 and cpu["tflops"]["fp32"] > 0.001
    assert cpu["extra"]["threads"] >= 1
    parse_profile(data)  # what it writes, the planner reads


class FakeNVML:
    """NVML's functions as pynvml exposes them, for two GPUs listed in the opposite order to CUDA's."""

    def __init__(self, gpus: list[dict[str, Any]]) -> None:
        self.gpus = gpus

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> dict[str, Any]:
        return self.gpus[i]

    def nvmlDeviceGetUUID(self, h: dict[str, Any]) -> bytes:
        return f"GPU-{h['uuid']}".encode()

    def nvmlDeviceGetName(self, h: dict[str, Any]) -> str:
        return str(h["name"])

    def nvmlDeviceGetMemoryInfo(self, h: dict[str, Any]) -> SimpleNamespace:
        return SimpleNamespace(total=h["total"], free=h["free"], used=h["total"] - h["free"])

    def nvmlDeviceGetUtilizationRates(self, h: dict[str, Any]) -> SimpleNamespace:
        return SimpleNamespace(gpu=h["util"], memory=0)

    def nvmlSystemGetDriverVersion(self) -> str:
        return "580.65"


def fake_torch(props: list[SimpleNamespace], mem: list[tuple[int, int]] | None = None, mps: bool = False) -> Any:
    cuda = SimpleNamespace(
        is_available=lambda: bool(props),
        device_count=lambda: len(props),
        get_device_properties=lambda i: props[i],
        mem_get_info=lambda i: mem[i] if mem else (0, 0),
    )
    return SimpleNamespace(
        cuda=cuda,
        backends=SimpleNamespace(mps=SimpleNamespace(is_available=lambda: mps)),
        mps=SimpleNamespace(recommended_max_memory=lambda: 21_000_000_000),
    )


PROPS = [
    SimpleNamespace(name="NVIDIA GeForce RTX 3090", uuid="aaaa", major=8, minor=6, multi_processor_count=82),
    SimpleNamespace(name="NVIDIA GeForce RTX 4070", uuid="bbbb", major=8, minor=9, multi_processor_count=46),
]


def test_cuda_devices_are_matched_to_nvml_by_uuid() -> None:
    nvml = FakeNVML(
        [
            {
                "uuid": "bbbb",
                "name": "NVIDIA GeForce RTX 4070",
                "total": 12_000_000_000,
                "free": 11_000_000_000,
                "util": 7,
            },
            {
                "uuid": "aaaa",
                "name": "NVIDIA GeForce RTX 3090",
                "total": 24_000_000_000,
                "free": 20_000_000_000,
                "util": 55,
            },
        ]
    )
    got = cuda_devices(fake_torch(PROPS), nvml)
    assert [(d.index, d.name) for d in got] == [(0, "NVIDIA GeForce RTX 3090"), (1, "NVIDIA GeForce RTX 4070")]
    assert [d.memory_free_gb for d in got] == [20.0, 11.0] and [d.utilization for d in got] == [55.0, 7.0]
    assert got[0].extra == {"compute_capability": "8.6", "multiprocessors": 82, "driver": "580.65"}


def test_cuda_devices_without_nvml_ask_torch() -> None:
    got = cuda_devices(fake_torch(PROPS, mem=[(23_000_000_000, 24_000_000_000), (1, 2)]), None)
    assert got[0].memory_gb == 24.0 and got[0].memory_free_gb == 23.0 and got[0].utilization is None


def test_no_cuda_no_devices() -> None:
    assert cuda_devices(fake_torch([]), FakeNVML([])) == []


def test_a_mac_lists_its_mps_device_instead_of_the_cpu() -> None:
    psutil_like = SimpleNamespace(
        virtual_memory=lambda: SimpleNamespace(total=32_000_000_000, available=20_000_000_000),
        cpu_count=lambda logical=True: 10,
    )
    torch_like = fake_torch([], mps=True)
    mps = mps_device(torch_like, psutil_like)
    assert mps is not None and (mps.kind, mps.memory_gb, mps.memory_free_gb) == ("mps", 32.0, 21.0)
    assert [d.kind for d in detect(torch_like, FakeNVML([]), psutil_like)] == ["mps"]


def test_microbenchmarks_measure_this_cpu() -> None:
    import torch

    from homespec.profiling.microbench import matmul_tflops, memory_gb_s

    assert matmul_tflops(torch, "cpu", "fp32", budget_s=0.05) > 0.001
    assert memory_gb_s(torch, "cpu", budget_s=0.05, max_bytes=64 << 20) > 0.1


def test_profile_round_trips_and_the_checked_in_profiles_parse() -> None:
    for path in sorted((ROOT / "profiles").glob("*.json")):
        profile = load_profile(path)
        again = parse_profile(json.loads(json.dumps(profile.to_json())))
        assert again.to_json() == profile.to_json()
        topo = profile.topology("fp16")
        assert topo.devices and all(d.flops > 0 and d.mem_bw > 0 for d in topo.devices)


def test_merged_profiles_join_hosts_and_keep_measured_links() -> None:
    a = parse_profile({"name": "a", "hosts": [_host("pc")], "links": {"measured": [_link("pc", "mac", 2.0)]}})
    b = parse_profile({"name": "b", "hosts": [_host("mac")], "links": {"measured": [_link("mac", "pc", 1.0)]}})
    merged = merge_profiles([a, b])
    assert [h.name for h in merged.hosts] == ["pc", "mac"] and merged.head == ""
    topo = merged.topology()
    assert topo.link("pc", "mac").latency_s == pytest.approx(1e-3)  # the later measurement of the same pair


def test_a_malformed_profile_names_the_file_and_the_problem(tmp_path: Path) -> None:
    from homespec.errors import ConfigError

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": 1, "hosts": [{"name": "x", "devices": [{"name": "gpu"}]}]}))
    with pytest.raises(ConfigError, match=r"bad.json is malformed: KeyError"):
        load_profile(bad)
    bad.write_text(json.dumps({"schema": 9, "hosts": []}))
    with pytest.raises(ConfigError, match="schema 9"):
        load_profile(bad)


def _host(name: str) -> dict[str, Any]:
    device = {"kind": "cuda", "name": "GPU", "memory_gb": 8, "mem_bw_gb_s": 500, "tflops": {"fp16": 30}}
    return {"name": name, "devices": [device]}


def _link(a: str, b: str, ms: float) -> dict[str, Any]:
    return {"a": a, "b": b, "latency_ms": ms, "latency_p90_ms": ms, "mb_per_s": 100}
