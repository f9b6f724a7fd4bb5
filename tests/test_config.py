"""Config defaults that depend on the mode and device (config.default_tree)."""

from __future__ import annotations

import pytest

from homespec.config import AR_CPU_BUDGET, GenerationConfig, TreeConfig, default_tree
from homespec.errors import ConfigError


@pytest.mark.parametrize(
    ("mode", "device", "budget"),
    [("ar", "cpu", AR_CPU_BUDGET), ("ar", "cuda:0", TreeConfig().budget), ("specpipe", "cpu", TreeConfig().budget)],
)
def test_default_tree_keeps_cpu_single_process_drafts_small(mode: str, device: str, budget: int) -> None:
    assert default_tree(mode, device).budget == budget
    assert GenerationConfig().tree is None  # resolved by the engine for the request's mode and device


def test_tree_config_is_validated_once() -> None:
    with pytest.raises(ConfigError, match="budget"):
        TreeConfig(budget=0)
