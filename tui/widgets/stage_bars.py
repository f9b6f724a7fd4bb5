"""The stage pane: one row per stage with what it is (device, layers, link to the next), its busy share over the
last seconds as a bar and a sparkline, and the size of the wave it holds now; then the head's draft source."""

from __future__ import annotations

from collections import deque

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from homespec.events import StageInfo, StageUtilization

HISTORY = 12  # sparkline points
SPARKS = "▁▂▃▄▅▆▇█"


def bar(fraction: float, width: int = 16) -> Text:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return Text.assemble(("█" * filled, "green"), ("░" * (width - filled), "grey35"))


def sparkline(values: list[float]) -> str:
    return "".join(SPARKS[min(len(SPARKS) - 1, int(max(0.0, min(1.0, v)) * len(SPARKS)))] for v in values)


class StageBars(Static):
    DEFAULT_CSS = "StageBars { height: auto; }"

    def __init__(self, **kw: object) -> None:
        super().__init__("", **kw)  # type: ignore[arg-type]
        self.stages: list[StageInfo] = []
        self.busy: list[float] = []
        self.waves: list[int] = []
        self.history: list[deque[float]] = []
        self.draft = ""

    def configure(self, stages: list[StageInfo], draft: str) -> None:
        self.stages, self.draft = stages, draft
        self.busy = [0.0] * len(stages)
        self.waves = [0] * len(stages)
        self.history = [deque(maxlen=HISTORY) for _ in stages]
        self._draw()

    def show(self, util: StageUtilization, waves: list[int] | None = None, draft: str | None = None) -> None:
        self.busy = list(util.busy)[: len(self.stages)]
        for h, b in zip(self.history, self.busy, strict=False):
            h.append(b)
        if waves is not None:
            self.waves = waves
        if draft:
            self.draft = draft
        self._draw()

    def _draw(self) -> None:
        table = Table(box=None, expand=False, pad_edge=False)
        for name in ("#", "device", "layers", "busy", "", "recent", "wave", "link ms"):
            table.add_column(name, style="dim" if name in ("layers", "link") else None, no_wrap=True)
        for i, s in enumerate(self.stages):
            busy = self.busy[i] if i < len(self.busy) else 0.0
            table.add_row(
                str(i + 1),
                s.device,
                f"{s.layers[0]}–{s.layers[1] - 1}",
                bar(busy, 10),
                f"{busy:4.0%}",
                sparkline(list(self.history[i])) if i < len(self.history) else "",
                str(self.waves[i]) if i < len(self.waves) else "",
                f"{s.link_ms:.2f}" if s.link_ms else "—",
            )
        grid = Table.grid()
        grid.add_row(table)
        foot = Text.assemble(("draft ", "dim"), (self.draft or "none", "bold"))
        emulated = sorted({s.emulated_on for s in self.stages if s.emulated_on})
        if emulated:
            foot.append(f"   (emulated device and link times; computed on {', '.join(emulated)})", style="dim")
        grid.add_row(foot)
        self.update(grid)
