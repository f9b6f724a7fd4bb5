"""Typed engine events: what ``engine.generate`` yields and every face (CLI, server, TUI) consumes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["eos", "length", "stop"]


@dataclass(frozen=True)
class TokensCommitted:
    """Tokens the target committed this step, and the text they add to the output."""

    tokens: tuple[int, ...]
    text: str
    step: int


@dataclass(frozen=True)
class StepCompleted:
    """One target forward (one wave through every stage) and what verification made of it."""

    step: int
    wave_size: int  # nodes the target computed
    emitted: int  # tokens committed (accepted drafts + the bonus token)
    accepted: int  # draft nodes accepted
    flushed: bool


@dataclass(frozen=True)
class GenerationStats:
    mode: str
    draft: str
    prompt_tokens: int
    tokens: int
    target_forwards: int
    tokens_per_forward: float
    steps: int  # pipeline steps (in process: target forwards)
    tokens_per_step: float
    stages: int
    accepted_per_step: float
    draft_forwards: int
    wall_s: float  # emulated runs: on the emulated clock (real seconds / time_scale)
    tokens_per_s: float
    busy_fraction: tuple[float, ...] = ()  # per stage (pipelined modes): busy time / request wall time
    time_scale: float = 1.0  # emulated runs: how many times slower than the modeled clock it really ran
    draft_cost: float = 0.0  # draft compute, in target forwards (parameter-count proxy)
    draft_choices: tuple[str, ...] = ()  # ``auto``: each choice of arm, when ("@verification") and why

    def as_dict(self) -> dict[str, object]:
        out = dict(self.__dict__)
        out["busy_fraction"] = list(self.busy_fraction)
        out["draft_choices"] = list(self.draft_choices)
        return out


@dataclass(frozen=True)
class GenerationFinished:
    reason: FinishReason
    text: str
    tokens: tuple[int, ...]
    stats: GenerationStats


Event = TokensCommitted | StepCompleted | GenerationFinished
