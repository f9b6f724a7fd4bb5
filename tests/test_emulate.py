"""The emulated cluster's clock (pipeline/emulate.py): modeled stage and link times from a profile, read by the one
profile reader and timed by the planner's model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from homespec.core.planner import PlanOptions, stage_seconds
from homespec.errors import ConfigError
from homespec.pipeline.emulate import auto_time_scale, stage_timings
from homespec.profiling.profile import load_profile

PROFILES = Path(__file__).resolve().parents[1] / "profiles"


def test_8x3090_profile_models_memory_bound_stages_and_1gbe_hops() -> None:
    timings = stage_timings(load_profile(PROFILES / "home-8x3090-1gbe.json"), 8)
    assert [t.layers for t in timings] == [10] * 8
    # 10 layers x 856M params x 2 bytes / 936 GB/s, + 0.5 ms overhead
    read_ms = 10 * 856e6 * 2 / 936e9 * 1e3
    assert timings[0].step_ms(1) == pytest.approx(read_ms + 0.5)  # one row: memory-bound
    row_ms = 2 * 10 * 856e6 / (71e12 * 0.5) * 1e3
    assert timings[0].step_ms(200) == pytest.approx(200 * row_ms + 0.5)  # many rows: compute-bound
    hosts = [t.host for t in timings]
    inter = [i for i in range(8) if hosts[i] != hosts[(i + 1) % 8]]
    assert inter == [2, 5, 7]  # tower-a -> tower-b -> tower-c -> back to the head on tower-a
    assert all(timings[i].link_ms == 0.3 for i in inter)
    assert timings[2].send_ms(1) == pytest.approx(0.3 + 8192 * 2 / 117e6 * 1e3)


def test_layers_follow_device_memory_in_the_mixed_profile() -> None:
    profile = load_profile(PROFILES / "home-mixed-wifi.json")
    timings = stage_timings(profile, 3)
    assert profile.emulated is not None
    assert sum(t.layers for t in timings) == profile.emulated.layers
    memory = [d.memory_gb for h in profile.hosts for d in h.devices]
    assert sorted(range(3), key=lambda i: timings[i].layers) == sorted(range(3), key=lambda i: memory[i])


def test_time_scale_slows_the_clock_when_stages_outnumber_cores() -> None:
    assert auto_time_scale(8, cores=2) == 4.0
    assert auto_time_scale(2, cores=2) == 1.0
    assert auto_time_scale(1, cores=16) == 1.0


def test_bad_profiles_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_profile(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hosts": [{"name": "a"}]}))
    with pytest.raises(ConfigError, match="malformed: KeyError: 'devices'"):
        load_profile(bad)
    bad.write_text(json.dumps({"hosts": [], "emulated_model": {"layers": 8}}))
    with pytest.raises(ConfigError, match="malformed: KeyError: 'hidden_size'"):
        load_profile(bad)
    with pytest.raises(ConfigError, match="cannot emulate 9 stages"):
        stage_timings(load_profile(PROFILES / "home-8x3090-1gbe.json"), 9)


def test_the_emulator_times_a_stage_with_the_planners_model() -> None:
    """One time model: an emulated stage's step is the planner's ``stage_seconds`` for the same parameters, bytes,
    device and overhead (the planner's KV read set to none, since the emulated model names no KV shape)."""
    from homespec.core.planner import ModelShape

    profile = load_profile(PROFILES / "home-8x3090-1gbe.json")
    timing = stage_timings(profile, 8)[3]
    device = profile.topology("fp16").devices[3]
    # a model shape of exactly 856M parameters per layer: h=8192, q=8192, kv=1024, intermediate ... solved below
    h, kv = 8192, 1024
    attention = h * h + 2 * h * kv + h * h
    inter = (856_000_000 - attention - 2 * h) // (3 * h)
    shape = ModelShape("x", 80, h, inter, 64, 8, 128, 1000, False)
    opts = PlanOptions(weights="fp16", context=1, overhead_s=0.5e-3)
    for rows in (1, 32, 200):
        planned = stage_seconds(shape, opts, device, timing.layers, False, rows) * 1e3
        assert timing.step_ms(rows) == pytest.approx(planned, rel=1e-3)


def test_a_real_cluster_profile_cannot_be_emulated(tmp_path: Path) -> None:
    real = json.loads((PROFILES / "home-8x3090-1gbe.json").read_text())
    del real["emulated_model"]
    path = tmp_path / "real.json"
    path.write_text(json.dumps(real))
    with pytest.raises(ConfigError, match="names no emulated_model"):
        stage_timings(load_profile(path), 2)
