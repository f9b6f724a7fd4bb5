"""Runs the engine off the UI thread (DESIGN §9, STYLE "the UI is a consumer"): builds it, generates with it, and
turns its events into the app's messages. Ctrl+C sets ``stop``: the generation loop closes the engine's event
iterator at the next event, which ends the request on every stage (its KV is freed), so the next prompt starts
clean."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from homespec.errors import HomespecError, PeerLostError
from homespec.events import (
    Event,
    GenerationFinished,
    StageUtilization,
    StepCompleted,
    TokensCommitted,
    TreeSnapshot,
)
from tui import messages as m


class Bridge:
    def __init__(self, post: Callable[[Any], object], make_engine: Callable[[Callable[[str], None]], Any]) -> None:
        """``make_engine(progress)`` builds the engine, telling ``progress`` what it is doing."""
        self.post, self._make_engine = post, make_engine
        self.engine: Any = None
        self.stop = threading.Event()

    def load(self) -> None:
        """Build the engine (model load, stage processes): EngineReady or EngineFailed."""
        self.post(m.LoadProgress("loading the model and starting the stages…"))

        def progress(text: str) -> None:
            self.post(m.LoadProgress(text))

        try:
            self.engine = self._make_engine(progress)
        except HomespecError as exc:
            self.post(m.EngineFailed(exc.message, exc.hint or ""))
            return
        except Exception as exc:  # anything else still gets a screen, never a traceback
            self.post(m.EngineFailed(f"{type(exc).__name__}: {exc}"))
            return
        self.post(m.EngineReady(self.engine))

    def generate(self, conversation: list[dict[str, str]], config: Any) -> None:
        """Generate the assistant's reply to ``conversation``; posts messages until ReplyDone or ReplyFailed."""
        from homespec.engine import chat_ids

        self.stop.clear()
        try:
            events = self.engine.generate(chat_ids(self.engine.tokenizer, conversation), config)
            try:
                finished = self.relay(events)
            finally:
                events.close()  # a stopped request leaves every stage now
        except HomespecError as exc:
            self.post(m.ReplyFailed(exc.message, exc.hint or "", lost=isinstance(exc, PeerLostError)))
            return
        except Exception as exc:
            self.post(m.ReplyFailed(f"{type(exc).__name__}: {exc}"))
            return
        self.post(m.ReplyDone(finished, stopped=finished is None))

    def relay(self, events: Iterable[Event]) -> GenerationFinished | None:
        """Post the app's message for each engine event until the generation finishes or ``stop`` is set."""
        tokens = accepted = forwards = 0
        for event in events:
            if self.stop.is_set():
                return None
            if isinstance(event, TokensCommitted):
                if event.text:
                    self.post(m.Committed(event.text))
            elif isinstance(event, StepCompleted):
                tokens += event.emitted
                forwards += 1
                accepted += event.accepted
                self.post(m.StepDone(tokens, event.step, accepted, forwards, event.flushed, event.wave_size))
            elif isinstance(event, TreeSnapshot):
                self.post(m.TreeChanged(event))
            elif isinstance(event, StageUtilization):
                self.post(m.StagesChanged(event))
            elif isinstance(event, GenerationFinished):
                return event
        return None

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
