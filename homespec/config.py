"""Configuration as frozen dataclasses, validated once on construction.

There is no layered loader: a command's flags build these (their defaults are the defaults here), and the only
settings read from the environment are paths and switches named where they are read (``HOMESPEC_CACHE`` and
``HOMESPEC_CONFIG`` here, ``HOMESPEC_API_KEY`` by ``serve``, ``HOMESPEC_LOG``, ``HOMESPEC_STAGE_THREADS``).
Devices and links come from profile files (``profiling/profile.py``), the cluster to emulate from
``pipeline/emulate.py``'s.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from homespec.errors import ConfigError

Mode = Literal["ar", "pp", "tree", "specpipe"]
MODES: tuple[Mode, ...] = ("ar", "pp", "tree", "specpipe")
PIPELINED_MODES: tuple[Mode, ...] = ("pp", "tree", "specpipe")  # split into stage processes

#: ``homespec serve``: seconds a client has to send a request's head, and then its body (--read-timeout).
DEFAULT_READ_TIMEOUT_S = 10.0

DRAFT_SPECS = (  # the grammar of --draft, parsed by model/drafts/__init__.py
    "auto | none | ngram | recycle[:FILE] | head[:FILE] | eagle:PATH | early-exit[:K] | model:PATH, or several joined "
    "by + "
    "(ngram+recycle)"
)


def cache_dir() -> Path:
    """HomeSpec's cache root: ``$HOMESPEC_CACHE`` or ``~/.cache/homespec``."""
    env = os.environ.get("HOMESPEC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "homespec"


def config_dir() -> Path:
    """HomeSpec's configuration root (key pairs, trusted heads): ``$HOMESPEC_CONFIG`` or ``~/.config/homespec``."""
    env = os.environ.get("HOMESPEC_CONFIG")
    return Path(env).expanduser() if env else Path.home() / ".config" / "homespec"


@dataclass(frozen=True)
class SamplingConfig:
    """How the target's next token is chosen (DESIGN §4.4). ``temperature == 0`` means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (0.0 <= self.temperature <= 100.0):
            raise ConfigError(f"temperature must be in [0, 100], got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not (0 <= self.seed < 2**63):
            raise ConfigError(f"seed must be in [0, 2**63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class TreeConfig:
    """Shape of the speculative token tree a draft source grows each step.

    ``budget``: most draft nodes added per step; ``depth``: most draft levels per step;
    ``width``: nodes kept per level (model drafts) or branches per match (n-gram).
    Defaults were measured on the bundled model (BENCHMARKS.md).
    """

    budget: int = 24
    depth: int = 6
    width: int = 4

    def __post_init__(self) -> None:
        for name in ("budget", "depth", "width"):
            value = getattr(self, name)
            if not (1 <= value <= 1024):
                raise ConfigError(f"tree {name} must be in [1, 1024], got {value}")


AR_CPU_BUDGET = 2  # BENCHMARKS.md: on CPU a forward of 5 rows costs ~1.6x one row, 3 rows ~1x (small-M GEMM)


def default_tree(mode: str, device: str) -> TreeConfig:
    """The tree shape a request gets when it names none: in ``ar`` on a CPU, the draft is cut to the rows that
    cost (almost) nothing more than one; everywhere else (GPUs, and the pipelined modes, where rows ride in waves
    beside the pipeline) the measured default ``TreeConfig()``."""
    if mode == "ar" and device == "cpu":
        return TreeConfig(budget=AR_CPU_BUDGET)
    return TreeConfig()


@dataclass(frozen=True)
class GenerationConfig:
    """One request's knobs. ``tree`` None: the mode's and device's default (``default_tree``)."""

    max_tokens: int = 256
    sampling: SamplingConfig = SamplingConfig()
    tree: TreeConfig | None = None
    stop_on_eos: bool = True
    stop: tuple[str, ...] = ()  # stop strings: the output ends before the first one, which is never emitted
    trace: bool = False  # also yield a TreeSnapshot per verification (the TUI's live tree)

    def __post_init__(self) -> None:
        from homespec.core.stops import MAX_STOP_CHARS, MAX_STOPS

        if not (1 <= self.max_tokens <= 1_000_000):
            raise ConfigError(f"max_tokens must be in [1, 1000000], got {self.max_tokens}")
        ok = all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in self.stop)
        if len(self.stop) > MAX_STOPS or not ok:
            raise ConfigError(f"stop: at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters")
