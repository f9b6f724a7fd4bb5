"""Typed engine events: what ``engine.generate`` yields and every face (CLI, server, TUI) consumes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from homespec.core.step import TokenLogprob

__all__ = ["TokenLogprob"]  # defined with the decoding step that computes it; part of the events API

FinishReason = Literal["eos", "length", "stop"]


@dataclass(frozen=True)
class TokensCommitted:
    """Tokens the target committed this step, and the text they add to the output."""

    tokens: tuple[int, ...]
    text: str
    step: int
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token


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
    weights: str = "auto"  # the weight format (--weights)
    weight_bytes: tuple[int, ...] = ()  # per stage: the bytes of weights it holds

    def as_dict(self) -> dict[str, object]:
        out = dict(self.__dict__)
        out["busy_fraction"] = list(self.busy_fraction)
        out["draft_choices"] = list(self.draft_choices)
        out["weight_bytes"] = list(self.weight_bytes)
        return out


@dataclass(frozen=True)
class GenerationFinished:
    reason: FinishReason
    text: str
    tokens: tuple[int, ...]
    stats: GenerationStats
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token


@dataclass(frozen=True)
class GenerationFailed:
    """The request ended with an error of its own (a stage failed it, e.g. its cache was full); the engine, its
    stages and every other request go on. Batches yield it; ``Engine.generate`` raises RequestFailedError instead."""

    message: str


@dataclass(frozen=True)
class TreeNodeView:
    """One node of a TreeSnapshot."""

    id: int
    parent: int  # -1: the root
    text: str  # its token's text
    state: Literal["drafted", "sent", "done"]
    stage: int  # the last stage (0-based) the node's wave went through: done nodes the last one; drafted: -1


@dataclass(frozen=True)
class TreeSnapshot:
    """A request's token tree as one verification found it (only when ``GenerationConfig.trace``): its nodes in
    the head's order, which of them the verification accepted (in path order) and which it pruned."""

    step: int
    stages: int
    nodes: tuple[TreeNodeView, ...]
    accepted: tuple[int, ...]
    pruned: tuple[int, ...]
    flushed: bool


@dataclass(frozen=True)
class StageInfo:
    """What a stage is, for the stage pane: its device, its layers [a, b) and the latency of its outgoing link
    (modeled when emulated; 0 when unknown)."""

    device: str
    layers: tuple[int, int]
    link_ms: float = 0.0
    emulated_on: str = ""  # emulated stages: the device really computing


@dataclass(frozen=True)
class StageUtilization:
    """Per stage, the share of the last few seconds it spent computing (emulated stages: on the modeled clock), and
    the draft source in use (``auto``: its current choice)."""

    busy: tuple[float, ...]
    draft: str = ""


Event = TokensCommitted | StepCompleted | GenerationFinished | GenerationFailed | TreeSnapshot | StageUtilization
