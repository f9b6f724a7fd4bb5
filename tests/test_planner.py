"""The planner (core/planner.py): literal placements, the dynamic programme against brute force, and the
``homespec plan`` table for Llama-3.1-70B over the mixed Wi-Fi profile (checked-in expected output)."""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from homespec.core.planner import (
    GB,
    Device,
    Link,
    ModelShape,
    PlanOptions,
    Topology,
    _stage_cost,
    plan,
    split_layers,
)
from homespec.errors import PlanError

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parents[1]

# A 0.85B-parameter Llama-like model: 16 layers of 45.1M parameters (90 MB in fp16), a 32k vocabulary.
TOY = ModelShape("toy-1b", 16, 2048, 5632, 16, 4, 128, 32000, tied_embeddings=False)
OPTS = PlanOptions(headroom_bytes=0.1 * GB, context=2048)


def gpu(host: str, index: int = 0, memory_gb: float = 24, bw_gb_s: float = 900, tflops: float = 70) -> Device:
    return Device(host, "GPU", "cuda", index, memory_gb * GB, bw_gb_s * GB, tflops * 1e12)


def test_toy_shape_counts_parameters_like_transformers() -> None:
    # q 2048², k and v 2048·512 each, o 2048², MLP 3·2048·5632, two norms
    assert TOY.layer_params == 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 5632 + 2 * 2048
    assert TOY.params == 16 * TOY.layer_params + 2 * 32000 * 2048 + 2048


def test_llama_70b_shape_matches_its_published_size() -> None:
    from homespec.model.shape import read_shape

    shape = read_shape(str(DATA / "llama-3.1-70b-instruct"))
    assert (shape.layers, shape.hidden, shape.kv_heads, shape.vocab) == (80, 8192, 8, 128256)
    assert shape.params * 2 == pytest.approx(141_107_412_992, rel=1e-4)  # the index's total_size (bf16)


@pytest.mark.parametrize(
    ("config", "total", "active"),
    [
        (dict(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
              num_key_value_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
              num_experts_per_tok=8, vocab_size=151936), 30.5e9, 3.3e9),  # Qwen3-30B-A3B
        (dict(model_type="mixtral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
              num_key_value_heads=8, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
              vocab_size=32000), 46.7e9, 12.9e9),  # Mixtral-8x7B
    ],
    ids=["qwen3-30b-a3b", "mixtral-8x7b"],
)  # fmt: skip
def test_a_mixture_of_experts_counts_every_expert_for_memory_and_the_touched_ones_for_reads(
    config: dict[str, object], total: float, active: float
) -> None:
    """Memory holds every expert (the published total); a row multiplies by its top k (the published active
    count); a step of n rows reads the experts n rows are expected to touch, so an MoE stage's modeled step grows
    with the wave where a dense one's is flat (memory-bound) until the compute catches up; specpipe's default wave
    is then the largest that at most doubles a step's reads (2 rows for both; 32 for a dense model)."""
    from homespec.core.planner import default_wave_rows, stage_seconds
    from homespec.model.shape import shape_from_config

    shape = shape_from_config({**config, "tie_word_embeddings": False}, str(config["model_type"]))
    assert shape.params == pytest.approx(total, rel=0.01)
    assert shape.layers * shape.layer_row_params + shape.embed_params + shape.head_params == pytest.approx(
        active, rel=0.02
    )
    e, k = shape.experts, shape.experts_per_token
    reads = [shape.layer_read_params(r) for r in (1, 2, 8, 32, 4096)]
    assert reads == sorted(reads) and reads[0] == pytest.approx(shape.layer_row_params)
    assert reads[-1] == pytest.approx(shape.layer_params)
    touched = e * (1 - (1 - k / e) ** 8)
    expert = 3 * shape.hidden * shape.expert_intermediate
    assert reads[2] - reads[0] == pytest.approx((touched - k) * expert)
    dev = gpu("a", memory_gb=80, bw_gb_s=900, tflops=300)
    moe = [stage_seconds(shape, OPTS, dev, 4, False, r) for r in (1, 8)]
    dense = [stage_seconds(TOY, OPTS, dev, 4, False, r) for r in (1, 8)]
    assert moe[1] > 1.5 * moe[0] and dense[1] == pytest.approx(dense[0])
    assert default_wave_rows(shape) == 2 and default_wave_rows(TOY) == 32
    assert shape.layer_read_params(2) <= 2 * reads[0] < shape.layer_read_params(4)


def test_homogeneous_devices_share_the_layers_evenly() -> None:
    """Four equal GPUs, none of which holds the model alone (0.7 GB each, 1.7 GB of weights)."""
    topo = Topology(tuple(gpu("box", i, memory_gb=0.7) for i in range(4)), "box")
    p = plan(TOY, topo, OPTS)
    sizes = [b - a for a, b in (s.layers for s in p.stages)]
    assert len(sizes) == 4 and sum(sizes) == 16
    assert max(sizes) - min(sizes) <= 2  # the last stage carries the LM head: it may take a layer fewer
    assert p.stages[0].embed and p.stages[-1].head
    assert [s.layers[0] for s in p.stages] == [0, *itertools.accumulate(sizes[:-1])]


def test_a_device_that_only_slows_the_chain_is_left_out_with_the_reason() -> None:
    """Three GPUs that hold the model together, and a CPU with plenty of RAM at a twentieth of the bandwidth."""
    cpu = Device("box", "CPU", "cpu", 0, 64 * GB, 40 * GB, 1e12)
    topo = Topology((*(gpu("box", i, memory_gb=0.9) for i in range(3)), cpu), "box")
    p = plan(TOY, topo, OPTS)
    assert [s.device.kind for s in p.stages] == ["cuda"] * 3
    assert len(p.left_out) == 1 and p.left_out[0].device is cpu
    assert "only slows the chain" in p.left_out[0].reason and "ms without it" in p.left_out[0].reason


def test_memory_bounds_each_stage() -> None:
    """Neither GPU holds the model alone; the small one takes what fits (3 layers at most), the big one the rest,
    although both are equally fast (an even split would give each 8)."""
    small, big = gpu("a", memory_gb=0.6), gpu("b", memory_gb=1.8)
    p = plan(TOY, Topology((small, big), "a"), OPTS)
    by_device = {s.device: s for s in p.stages}
    assert set(by_device) == {small, big}
    s = by_device[small]
    assert s.memory_bytes + OPTS.headroom_bytes <= small.memory_bytes
    assert s.layers[1] - s.layers[0] <= 3
    for stage in p.stages:
        assert stage.memory_bytes + OPTS.headroom_bytes <= stage.device.memory_bytes


def test_a_device_too_small_for_one_layer_is_left_out() -> None:
    tiny = gpu("a", memory_gb=0.15)
    p = plan(TOY, Topology((tiny, gpu("b", memory_gb=8)), "a"), OPTS)
    assert [s.device.host for s in p.stages] == ["b"]
    assert p.left_out[0].device is tiny and "cannot hold one layer" in p.left_out[0].reason


def test_a_model_too_big_gets_an_error_with_the_numbers() -> None:
    topo = Topology((gpu("a", memory_gb=1), gpu("b", memory_gb=1)), "a")
    with pytest.raises(PlanError) as err:
        plan(TOY, topo, OPTS)
    message = str(err.value)
    assert "toy-1b does not fit" in message and "1.7 GB of fp16 weights" in message and "2.0 GB free" in message
    assert err.value.hint and "--weights" in err.value.hint


def test_kv_for_the_context_needs_headroom() -> None:
    """The same devices hold the model for a short context, not for a long one: the KV counts."""
    topo = Topology((gpu("a", memory_gb=1.3), gpu("b", memory_gb=1.3)), "a")
    short = plan(TOY, topo, PlanOptions(headroom_bytes=0.1 * GB, context=1024))
    kv = sum(s.kv_bytes for s in short.stages)
    assert kv == pytest.approx(16 * 2 * 4 * 128 * 2 * 1024)  # layers · (K + V) · kv heads · head dim · fp16 · tokens
    with pytest.raises(PlanError, match=r"GB of KV for 131072 tokens"):
        plan(TOY, topo, PlanOptions(headroom_bytes=0.1 * GB, context=131072))


def test_stages_can_be_forced_and_refused() -> None:
    topo = Topology(tuple(gpu("box", i, memory_gb=4) for i in range(4)), "box")
    assert len(plan(TOY, topo, PlanOptions(headroom_bytes=0.1 * GB, stages=2)).stages) == 2
    with pytest.raises(PlanError, match="--stages 5"):
        plan(TOY, topo, PlanOptions(headroom_bytes=0.1 * GB, stages=5))


def test_a_slow_link_pulls_the_chain_onto_one_host() -> None:
    """The model needs two GPUs; host a has one, host b two, behind a 10 MB/s link from a: the chain stays in b
    (the head on a pays the link once each way, a chain across it would pay it for every wave as well)."""
    a0, b0, b1 = gpu("a", 0, 1.2), gpu("b", 0, 1.2), gpu("b", 1, 1.2)
    p = plan(TOY, Topology((a0, b0, b1), "a", inter_host=Link(5e-3, 10e6)), OPTS)
    assert [s.device for s in p.stages] in ([b0, b1], [b1, b0])
    assert [x.device for x in p.left_out] == [a0]


def test_the_mode_model_orders_pp_tree_and_specpipe_as_designed() -> None:
    topo = Topology(tuple(gpu("box", i, memory_gb=0.7) for i in range(4)), "box")
    p = plan(TOY, topo, OPTS)
    assert p.tbt_s["specpipe"] < p.tbt_s["pp"] and p.tbt_s["tree"] < p.tbt_s["pp"]
    s, h = len(p.stages), OPTS.hit_rate
    tokens_per_step = max(1 / (h + (1 - h) * s), OPTS.tree_tokens / s)
    assert p.tbt_s["specpipe"] == pytest.approx(p.step_s / tokens_per_step, rel=1e-9)


def _brute_force(shape: ModelShape, opts: PlanOptions, topo: Topology, chain: list[Device]) -> float:
    best = math.inf
    for cuts in itertools.combinations(range(1, shape.layers), len(chain) - 1):
        bounds = list(itertools.pairwise((0, *cuts, shape.layers)))
        costs = [_stage_cost(shape, opts, topo, chain, k, b - a, a) for k, (a, b) in enumerate(bounds)]
        total = max(costs) if opts.mode == "specpipe" else sum(costs)
        best = min(best, total)
    return best


@settings(max_examples=60, deadline=None)
@given(
    layers=st.integers(2, 10),
    memories=st.lists(st.floats(0.2, 2.0), min_size=1, max_size=4),
    speeds=st.lists(st.floats(50, 1000), min_size=4, max_size=4),
    mode=st.sampled_from(["pp", "tree", "specpipe"]),
)
def test_split_layers_is_optimal(layers: int, memories: list[float], speeds: list[float], mode: str) -> None:
    shape = ModelShape("t", layers, 1024, 4096, 8, 8, 128, 8000, tied_embeddings=False)
    opts = PlanOptions(mode=mode, headroom_bytes=0.01 * GB, context=512)
    chain = [gpu("h", i, m, speeds[i]) for i, m in enumerate(memories)]
    topo = Topology(tuple(chain), "h")
    got = split_layers(shape, opts, topo, chain)
    want = _brute_force(shape, opts, topo, chain) if len(chain) <= layers else math.inf
    if want == math.inf:
        assert got is None
    else:
        assert got is not None and got[0] == pytest.approx(want, rel=1e-12)
        assert [b - a for a, b in got[1]] and all(b > a for a, b in got[1])


@pytest.mark.parametrize("weights", ["fp16", "int4"])
def test_plan_command_for_llama_70b_over_the_mixed_wifi_profile(weights: str) -> None:
    """The checked-in expected output (tests/data/plan-llama-3.1-70b-mixed-wifi-WEIGHTS.txt): fp16 does not fit in
    the 64 GB of the three devices and says so with the numbers; int4 places 80 layers on three machines."""
    import subprocess
    import sys

    cmd = [str(Path(sys.executable).parent / "homespec"), "plan", str(DATA / "llama-3.1-70b-instruct")]
    cmd += ["--profile", str(ROOT / "profiles" / "home-mixed-wifi.json"), "--weights", weights]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "120"}, cwd=ROOT)
    expected = (DATA / f"plan-llama-3.1-70b-mixed-wifi-{weights}.txt").read_text()
    assert out.stdout + out.stderr == expected
    assert out.returncode == (2 if weights == "fp16" else 0)
