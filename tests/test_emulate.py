"""The emulated cluster's clock (pipeline/emulate.py): modeled stage and link times from a profile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from homespec.errors import ConfigError
from homespec.pipeline.emulate import auto_time_scale, load_profile, stage_timings

PROFILES = Path(__file__).resolve().parents[1] / "profiles"


def test_8x3090_profile_models_memory_bound_stages_and_1gbe_hops() -> None:
    timings = stage_timings(load_profile(PROFILES / "home-8x3090-1gbe.json"), 8)
    assert [t.layers for t in timings] == [10] * 8
    # 10 layers x 856M params x 2 bytes / 936 GB/s + 0.5 ms overhead
    assert timings[0].base_ms == pytest.approx(10 * 856e6 * 2 / 936e9 * 1e3 + 0.5)
    assert timings[0].step_ms(1) == timings[0].base_ms  # one row: memory-bound
    assert timings[0].step_ms(200) == pytest.approx(200 * timings[0].ms_per_row)  # many rows: compute-bound
    hosts = [t.host for t in timings]
    inter = [i for i in range(8) if hosts[i] != hosts[(i + 1) % 8]]
    assert inter == [2, 5, 7]  # tower-a -> tower-b -> tower-c -> back to the head on tower-a
    assert all(timings[i].link_ms == 0.3 for i in inter)
    assert timings[2].send_ms(1) == pytest.approx(0.3 + 8192 * 2 / 117e6 * 1e3)


def test_layers_follow_device_memory_in_the_mixed_profile() -> None:
    profile = load_profile(PROFILES / "home-mixed-wifi.json")
    timings = stage_timings(profile, 3)
    assert sum(t.layers for t in timings) == profile["emulated_model"]["layers"]
    memory = [d["memory_gb"] for h in profile["hosts"] for d in h["devices"]]
    assert sorted(range(3), key=lambda i: timings[i].layers) == sorted(range(3), key=lambda i: memory[i])


def test_time_scale_slows_the_clock_when_stages_outnumber_cores() -> None:
    assert auto_time_scale(8, cores=2) == 4.0
    assert auto_time_scale(2, cores=2) == 1.0
    assert auto_time_scale(1, cores=16) == 1.0


def test_bad_profiles_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_profile(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hosts": []}))
    with pytest.raises(ConfigError, match="malformed"):
        load_profile(bad)
    with pytest.raises(ConfigError, match="cannot emulate 9 stages"):
        stage_timings(load_profile(PROFILES / "home-8x3090-1gbe.json"), 9)
