"""Server metrics in Prometheus text format (``GET /metrics``): requests by outcome, tokens, pipeline steps,
acceptance, per-stage busy fraction, the queue and the requests open on the stages. Fed by the service thread and
the routes; thread-safe; no client library needed for a handful of counters and gauges."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

from homespec.events import GenerationStats

OUTCOMES = ("ok", "cancelled", "error", "rejected")


class Metrics:
    def __init__(self, model: str) -> None:
        self.model = model
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.prompt_tokens = 0
        self.tokens = 0
        self.steps = 0
        self.forwards = 0
        self.accepted = 0
        self.busy: tuple[float, ...] = ()  # per stage, the newest StageUtilization (busy share of the last seconds)
        self.gauges: dict[str, Callable[[], float]] = {}  # name -> live reading (queue, active, open on stages)

    def finished(self, outcome: str, stats: GenerationStats | None = None) -> None:
        with self._lock:
            self.requests[outcome] += 1
            if stats is not None:
                self.prompt_tokens += stats.prompt_tokens
                self.tokens += stats.tokens
                self.steps += stats.steps
                self.forwards += stats.target_forwards
                self.accepted += round(stats.accepted_per_step * stats.target_forwards)

    def render(self) -> str:
        with self._lock:
            lines: list[str] = []

            def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
                lines.append(f"# HELP homespec_{name} {help_}")
                lines.append(f"# TYPE homespec_{name} {kind}")
                lines.extend(f"homespec_{name}{labels} {value:g}" for labels, value in samples)

            metric(
                "requests_total", "counter", "requests by outcome",
                [(f'{{outcome="{o}"}}', self.requests[o]) for o in OUTCOMES],
            )  # fmt: skip
            metric("prompt_tokens_total", "counter", "prompt tokens of finished requests", [("", self.prompt_tokens)])
            metric("generated_tokens_total", "counter", "tokens generated", [("", self.tokens)])
            metric("pipeline_steps_total", "counter", "pipeline steps of finished requests", [("", self.steps)])
            metric("target_forwards_total", "counter", "waves verified", [("", self.forwards)])
            metric("accepted_drafts_total", "counter", "draft tokens accepted", [("", self.accepted)])
            per_step = _ratio(self.tokens, self.steps)
            metric("tokens_per_step", "gauge", "generated tokens / pipeline steps", [("", per_step)])
            metric(
                "acceptance", "gauge", "accepted drafts per verified wave", [("", _ratio(self.accepted, self.forwards))]
            )
            metric(
                "stage_busy_fraction", "gauge", "busy share of the last few seconds per stage (at the last step)",
                [(f'{{stage="{i}"}}', b) for i, b in enumerate(self.busy)],
            )  # fmt: skip
            for name, read in self.gauges.items():
                metric(name, "gauge", name.replace("_", " "), [("", float(read()))])
            return "\n".join(lines) + "\n"


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0
