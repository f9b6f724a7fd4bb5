"""Lossless sampling on the real bundled model: with every draft source, seeded sampling gives the same tokens as the
non-speculative run with the same seed (DESIGN §4.4). The engines run the default weights (``--weights auto``: the
GGUF's int4 blocks), whose stages give a row the same bits whatever rides with it, so the comparison is exact; the
float path's sampling is the same code (tests/test_sampling.py checks the sampler against the fp32 target)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from homespec.config import GenerationConfig, SamplingConfig
from tests.conftest import EQUIVALENCE_PROMPTS
from tests.test_equivalence import FULL_TREE, finish, prompts_for

pytestmark = pytest.mark.slow

WEIGHTS = "int4"  # what --weights auto runs on the bundled GGUF
_PLAIN: dict[tuple[tuple[int, ...], GenerationConfig], tuple[int, ...]] = {}  # the plain run, shared by the drafts


def plain_tokens(engines: Callable[..., Any], ids: list[int], config: GenerationConfig) -> tuple[int, ...]:
    """The non-speculative run's tokens for this prompt and config (computed once per test process)."""
    key = (tuple(ids), config)
    if key not in _PLAIN:
        _PLAIN[key] = tuple(finish(engines("none", weights=WEIGHTS), ids, config).tokens)
    return _PLAIN[key]


@pytest.mark.parametrize("draft", ["ngram", "recycle", "head", "auto", "early-exit", "model:{truncated}"])
def test_seeded_sampling_equals_plain_sampling(
    draft: str, engines: Callable[..., Any], chat_ids: Callable[[str], list[int]]
) -> None:
    spec = engines(draft, weights=WEIGHTS)
    for seed, prompt in enumerate(prompts_for(draft, 4)):
        ids = chat_ids(prompt)
        config = GenerationConfig(48, SamplingConfig(temperature=0.8, seed=1234 + seed), tree=FULL_TREE)
        want = plain_tokens(engines, ids, config)
        got = finish(spec, ids, config)
        assert tuple(got.tokens) == want, f"seed {1234 + seed}: speculative sampling diverged from plain sampling"


def test_top_p_top_k_sampling_is_lossless(engines: Callable[..., Any], chat_ids: Callable[[str], list[int]]) -> None:
    ids = chat_ids(EQUIVALENCE_PROMPTS[5])
    config = GenerationConfig(48, SamplingConfig(temperature=1.0, top_p=0.9, top_k=50, seed=7), tree=FULL_TREE)
    assert tuple(finish(engines("ngram", weights=WEIGHTS), ids, config).tokens) == plain_tokens(engines, ids, config)


def test_different_seeds_give_different_samples(
    engines: Callable[..., Any], chat_ids: Callable[[str], list[int]]
) -> None:
    ids = chat_ids(EQUIVALENCE_PROMPTS[4])
    outs = {
        finish(engines("none", weights=WEIGHTS), ids, GenerationConfig(24, SamplingConfig(1.0, seed=s))).tokens
        for s in range(4)
    }
    assert len(outs) > 1
