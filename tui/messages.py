"""Textual messages the bridge posts to the app (from its generation thread). High-rate ones (the tree, the stage
bars) replace an older one of the same kind still waiting in the queue (``can_replace``), so a fast stream never
floods the screen: the UI draws the newest state, not every state."""

from __future__ import annotations

from typing import Any

from textual.message import Message

from homespec.events import GenerationFinished, GenerationStats, StageUtilization, TreeSnapshot


class EngineReady(Message):
    def __init__(self, engine: Any) -> None:
        super().__init__()
        self.engine = engine


class EngineFailed(Message):
    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__()
        self.message, self.hint = message, hint


class LoadProgress(Message):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class Committed(Message):
    """Text added to the reply (never coalesced: every piece is shown)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class StepDone(Message):
    """Counters after a verified wave, for the status line."""

    def __init__(
        self, tokens: int, steps: int, accepted: int, forwards: int, flushed: bool, wave_size: int = 0
    ) -> None:
        super().__init__()
        self.tokens, self.steps, self.accepted, self.forwards, self.flushed = tokens, steps, accepted, forwards, flushed
        self.wave_size = wave_size

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, StepDone)


class TreeChanged(Message):
    def __init__(self, snapshot: TreeSnapshot) -> None:
        super().__init__()
        self.snapshot = snapshot

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, TreeChanged)


class StagesChanged(Message):
    def __init__(self, utilization: StageUtilization) -> None:
        super().__init__()
        self.utilization = utilization

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, StagesChanged)


class ReplyDone(Message):
    def __init__(self, finished: GenerationFinished | None, stopped: bool) -> None:
        super().__init__()
        self.finished, self.stopped = finished, stopped

    @property
    def stats(self) -> GenerationStats | None:
        return self.finished.stats if self.finished else None


class ReplyFailed(Message):
    """The reply failed; ``lost``: a stage was lost, so the engine must be rebuilt before the next prompt."""

    def __init__(self, message: str, hint: str = "", lost: bool = False) -> None:
        super().__init__()
        self.message, self.hint, self.lost = message, hint, lost
