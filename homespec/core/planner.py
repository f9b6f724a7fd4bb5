"""Which stage gets which layers. Pure: stdlib only. Today an even split; the profile-driven planner of
DESIGN §6 (issue: the home cluster) grows here."""

from __future__ import annotations

import itertools


def even_split(num_layers: int, stages: int) -> list[tuple[int, int]]:
    """Contiguous layer ranges [a, b) for ``stages`` stages, sizes differing by at most one."""
    bounds = [round(i * num_layers / stages) for i in range(stages + 1)]
    return list(itertools.pairwise(bounds))
