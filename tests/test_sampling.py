"""Keyed sampling (DESIGN §4.4): deterministic per (seed, position), distributed as the target says, and steady
under the rounding of a tree's forward."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from homespec.config import SamplingConfig
from homespec.errors import ConfigError
from homespec.model.sampling import filtered_probs, keyed_exponentials, next_tokens


@given(st.integers(0, 2**63 - 1), st.integers(0, 10**6))
def test_keyed_exponentials_are_deterministic_and_positive(seed: int, position: int) -> None:
    e = keyed_exponentials(seed, position, 64)
    assert e.dtype == torch.float64 and bool((e > 0).all()) and bool(torch.isfinite(e).all())
    keyed_exponentials.cache_clear()
    assert torch.equal(e, keyed_exponentials(seed, position, 64))


def test_keyed_exponentials_are_exp1_and_decorrelated() -> None:
    """Mean and variance 1 over tokens, and no correlation between neighbouring tokens, positions or seeds."""
    e = keyed_exponentials(1, 5, 200_000)
    assert abs(float(e.mean()) - 1) < 0.01 and abs(float(e.var()) - 1) < 0.03
    for other in (e.roll(1), keyed_exponentials(1, 6, 200_000), keyed_exponentials(2, 5, 200_000)):
        corr = float(((e - 1) * (other - 1)).mean())
        assert abs(corr) < 0.01


def test_a_near_tie_in_the_tail_does_not_flip_the_draw() -> None:
    """The race draws the same token when fp32 rounding moves every logit a little (as a tree's forward does): of
    2000 draws from a distribution with a long flat tail, none change under 1e-5 of noise on the logits (the
    inverse CDF of one uniform, measured on these same draws, flips 2)."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(1, 20_000, generator=g) * 4
    logits[0, :5] += 10  # a few likely tokens and a long tail of unlikely ones
    cfg = SamplingConfig(temperature=0.7, seed=11)
    flips = 0
    for start in range(0, 2000, 250):
        positions = list(range(start, start + 250))
        noisy = logits + torch.randn(250, 20_000, generator=g) * 1e-5
        flips += sum(a != b for a, b in zip(next_tokens(logits.expand(250, -1), positions, cfg),
                                            next_tokens(noisy, positions, cfg), strict=True))  # fmt: skip
    assert flips == 0


def brute_force_probs(logits: list[float], cfg: SamplingConfig) -> tuple[list[float], list[float]]:
    """The filtered distribution by its definition, and the cumulative masses the top-p cut compared."""
    x = [v / cfg.temperature for v in logits]
    if cfg.top_k and cfg.top_k < len(x):
        kth = sorted(x, reverse=True)[cfg.top_k - 1]
        x = [v if v >= kth else -math.inf for v in x]
    m = max(x)
    e = [math.exp(v - m) for v in x]
    p = [v / sum(e) for v in e]
    masses: list[float] = []
    if cfg.top_p < 1.0:
        order = sorted(range(len(p)), key=lambda i: -p[i])
        kept, mass = set(), 0.0
        for i in order:
            masses.append(mass)
            if mass >= cfg.top_p:
                break
            kept.add(i)
            mass += p[i]
        p = [v if i in kept else 0.0 for i, v in enumerate(p)]
        p = [v / sum(p) for v in p]
    return p, masses


# distinct logits (0.01 apart), so that no boundary of top-k or top-p is a tie
DISTINCT = st.lists(st.integers(-1000, 1000), min_size=2, max_size=12, unique=True).map(lambda v: [x / 100 for x in v])


@given(DISTINCT, st.floats(0.1, 2.0), st.floats(0.05, 1.0), st.integers(0, 5))
def test_filtered_probs_match_brute_force(logits: list[float], temp: float, top_p: float, top_k: int) -> None:
    """Every probability equals the definition's, the zeros included (which tokens top-k and top-p keep)."""
    cfg = SamplingConfig(temperature=temp, top_p=top_p, top_k=top_k)
    want, masses = brute_force_probs(logits, cfg)
    assume(all(abs(m - top_p) > 1e-9 for m in masses))  # a cut exactly at a cumulative mass is a rounding tie
    got = filtered_probs(torch.tensor([logits], dtype=torch.float64), cfg)[0].tolist()
    assert sum(got) == pytest.approx(1.0)
    assert [g > 0 for g in got] == [w > 0 for w in want], (got, want)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-12)


@given(st.integers(2, 10), st.integers(1, 4), st.floats(0.1, 2.0))
def test_a_tie_at_the_top_k_boundary_keeps_every_tied_token(n: int, k: int, temp: float) -> None:
    """Logits in equal pairs: top-k keeps every token whose logit is at least the k-th largest (ties at the
    boundary all kept, as transformers' TopKLogitsWarper does), with their softmax mass and nothing else."""
    logits = [float(i // 2) for i in range(n)]
    got = filtered_probs(torch.tensor([logits], dtype=torch.float64), SamplingConfig(temp, top_k=k))[0].tolist()
    kth = sorted(logits, reverse=True)[min(k, n) - 1]
    kept = [i for i in range(n) if logits[i] >= kth]
    assert [i for i, g in enumerate(got) if g > 0] == kept
    want = {i: math.exp(logits[i] / temp) for i in kept}
    assert [got[i] for i in kept] == pytest.approx([want[i] / sum(want.values()) for i in kept], rel=1e-9)


def test_greedy_is_argmax() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    assert next_tokens(logits, [0, 1], SamplingConfig()) == [1, 0]


def test_same_key_same_draw_whatever_the_batch() -> None:
    cfg = SamplingConfig(temperature=1.0, seed=42)
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    alone = [next_tokens(logits[i : i + 1], [10 + i], cfg)[0] for i in range(6)]
    assert next_tokens(logits, [10 + i for i in range(6)], cfg) == alone


def test_bad_sampling_values_are_refused() -> None:
    with pytest.raises(ConfigError):
        SamplingConfig(temperature=-1)
    with pytest.raises(ConfigError):
        SamplingConfig(temperature=1, top_p=0)


def chi_square_critical(dof: int, z: float = 3.09) -> float:
    """Wilson–Hilferty approximation of the chi-square quantile (z = 3.09: p = 0.001)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.parametrize(
    "cfg",
    [SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.8, top_p=0.9), SamplingConfig(0.7, top_k=20)],
    ids=["t1", "t0.8-p0.9", "t0.7-k20"],
)
def test_keyed_sampler_matches_target_distribution(cfg: SamplingConfig, reference_model: Any, chat_ids: Any) -> None:
    """Draws over many keys of the real model's next-token distribution pass a chi-square test."""
    ids = chat_ids("Tell me a story about a dragon.")
    with torch.no_grad():
        logits = reference_model(torch.tensor([ids])).logits[0, -1:]  # [1, vocab]
    probs = filtered_probs(logits, cfg)[0]
    n, batch = 6000, 1000
    counts: dict[int, int] = {}
    for start in range(0, n, batch):
        for t in next_tokens(logits.expand(batch, -1), list(range(start, start + batch)), cfg):
            counts[t] = counts.get(t, 0) + 1
    assert all(probs[t] > 0 for t in counts), "drew a token the filters exclude"
    # bins: tokens expected >= 10 times each; the rest pooled
    big = [int(t) for t in torch.nonzero(probs * n >= 10).flatten()]
    expected = [float(probs[t]) * n for t in big]
    observed = [counts.get(t, 0) for t in big]
    rest_e, rest_o = n - sum(expected), n - sum(observed)
    if rest_e >= 10:
        expected.append(rest_e)
        observed.append(rest_o)
    chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))
    dof = len(expected) - 1
    assert dof >= 2
    assert chi2 < chi_square_critical(dof), f"chi2 {chi2:.1f} over {dof} dof"


def test_nucleus_head_shortcut_equals_full_sort() -> None:
    from homespec.model.sampling import _nucleus

    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(8, 5000, generator=g, dtype=torch.float64) * 3, dim=-1)
    for p in (0.1, 0.5, 0.9, 0.999):
        assert torch.equal(_nucleus(probs, p, head=64), _nucleus(probs, p, head=5000))
