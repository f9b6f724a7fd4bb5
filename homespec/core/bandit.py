"""SPIN's learned choice among draft sources (DESIGN §5): a seeded, discounted UCB bandit.

Arms are draft specs (``ngram+recycle``, ``ngram+head+recycle``, ...). The ``auto`` draft asks ``choose`` for an arm
at the start of each request and again every few verifications, and reports each window's reward with ``update``:
tokens emitted per unit of work, where a target forward is one unit and a draft forward counts as its share of the
target's compute. Rewards are discounted (``discount`` per update) so that the choice follows the text: prompt
lookup wins while a summary quotes its source, a trained head while it writes freely.

Pure and deterministic: the same arms, seed and rewards give the same choices (ties are broken by a seeded
``random.Random``), so step counts stay reproducible with ``auto``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


def cost_weight(mode: str) -> float:
    """How much a draft forward counts against the tokens it brings: in full in ``ar`` (draft and target share the
    device, in series), not at all in the pipelined modes (the draft runs on the head, beside the pipeline)."""
    return 1.0 if mode == "ar" else 0.0


def window_reward(tokens: int, verifications: int, draft_cost: float, weight: float) -> float:
    """Tokens per unit of work over a window: a target forward (verification) is one unit, a draft forward its
    share of a target forward (``draft_cost``, in target forwards) times ``weight``."""
    return tokens / (verifications + weight * draft_cost)


@dataclass(frozen=True)
class ArmEstimate:
    arm: str
    weight: float  # discounted number of windows played
    mean: float  # discounted mean reward (0 until played)
    bound: float  # the upper confidence bound the choice compared (inf: never played)


@dataclass(frozen=True)
class Choice:
    """One decision: the arm, why (``explore`` an unplayed arm, the best ``ucb``, or the ``only arm``), and every
    arm's estimate."""

    arm: str
    reason: str
    estimates: tuple[ArmEstimate, ...]

    def describe(self) -> str:
        played = ", ".join(f"{e.arm} {e.mean:.2f}" for e in self.estimates if e.weight > 0)
        return f"{self.arm} ({self.reason}{'; means ' + played if played else ''})"


class DraftBandit:
    def __init__(self, arms: Sequence[str], seed: int = 0, discount: float = 0.97, exploration: float = 0.15) -> None:
        if not arms or len(set(arms)) != len(arms):
            raise ValueError(f"a bandit needs distinct arms, got {list(arms)}")
        if not (0.0 < discount <= 1.0):
            raise ValueError(f"discount must be in (0, 1], got {discount}")
        if exploration < 0:
            raise ValueError(f"exploration must be >= 0, got {exploration}")
        self.arms = tuple(arms)
        self.discount, self.exploration = discount, exploration
        self.rng = random.Random(seed)
        self.weight = dict.fromkeys(self.arms, 0.0)  # discounted plays
        self.total = dict.fromkeys(self.arms, 0.0)  # discounted reward sum

    def mean(self, arm: str) -> float:
        return self.total[arm] / self.weight[arm] if self.weight[arm] > 0 else 0.0

    def estimates(self) -> tuple[ArmEstimate, ...]:
        plays = sum(self.weight.values())
        # rewards are tokens per unit of work (about 1 to 4): the bonus scales with the best mean seen
        scale = max((self.mean(a) for a in self.arms), default=1.0) or 1.0
        out = []
        for a in self.arms:
            w = self.weight[a]
            bound = (
                math.inf
                if w <= 0
                else self.mean(a) + self.exploration * scale * math.sqrt(math.log(max(plays, 1.0) + 1.0) / w)
            )
            out.append(ArmEstimate(a, w, self.mean(a), bound))
        return tuple(out)

    def choose(self) -> Choice:
        est = self.estimates()
        best = max(e.bound for e in est)
        ties = [e.arm for e in est if e.bound == best]
        arm = ties[0] if len(ties) == 1 else self.rng.choice(ties)
        reason = "only arm" if len(self.arms) == 1 else "explore" if math.isinf(best) else "ucb"
        return Choice(arm, reason, est)

    def update(self, arm: str, reward: float) -> None:
        """The window played with ``arm`` earned ``reward``; every arm's past counts less by ``discount``."""
        if arm not in self.weight:
            raise ValueError(f"unknown arm {arm!r}")
        if not math.isfinite(reward) or reward < 0:
            raise ValueError(f"reward must be finite and >= 0, got {reward}")
        for a in self.arms:
            self.weight[a] *= self.discount
            self.total[a] *= self.discount
        self.weight[arm] += 1.0
        self.total[arm] += reward
