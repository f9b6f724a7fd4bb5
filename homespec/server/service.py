"""The server's generation service: owns the engine and runs requests on one thread of its own, so the HTTP event
loop never blocks on the model (DESIGN §8).

A route turns a body into a ``Job`` (token ids, a GenerationConfig, a thread-safe ``post`` back to its event loop)
and submits it. Past ``max_queue`` waiting jobs the submit is refused (429). The thread takes jobs in order, runs them
through ``Engine.generate`` and posts every engine event, then ``Failed`` when something went wrong. A job whose
client went away (``cancelled``) is stopped at its next step: closing the engine's generator ends the request on
every stage and frees its KV. A lost stage fails only the job in flight (503); the engine is rebuilt for the next
job, and while it cannot be rebuilt every job gets a 503.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from homespec.config import GenerationConfig
from homespec.errors import HomespecError, PeerLostError
from homespec.events import GenerationFinished
from homespec.server.metrics import Metrics
from homespec.server.openai import ApiError

log = logging.getLogger("homespec.server")


@dataclass(frozen=True)
class Failed:
    """The job ended with an error, to be sent to its client in OpenAI's shape."""

    error: ApiError


@dataclass
class Job:
    prompt_ids: list[int]
    config: GenerationConfig
    post: Callable[[object], None]  # called from the service thread; must be thread-safe
    cancelled: threading.Event = field(default_factory=threading.Event)


class GenerationService:
    def __init__(self, make_engine: Callable[[], Any], metrics: Metrics, max_queue: int = 32) -> None:
        self._make_engine = make_engine
        self.metrics = metrics
        self.max_queue = max_queue
        self.engine: Any = make_engine()  # fails here, before the server listens, when the model cannot load
        self.down_reason: str | None = None
        self._queue: deque[Job] = deque()
        self._wake = threading.Condition()
        self._running = True
        self.active = 0
        self._thread = threading.Thread(target=self._loop, name="homespec-generation", daemon=True)
        metrics.gauges |= {
            "queue_length": lambda: len(self._queue),
            "requests_active": lambda: self.active,
            "requests_open_on_stages": self.open_on_stages,
        }

    def start(self) -> None:
        self._thread.start()

    def open_on_stages(self) -> int:
        """Requests whose KV is held on the stages (or in the in-process decoder) right now."""
        return int(self.engine.open_requests) if self.engine is not None else 0

    def submit(self, job: Job) -> None:
        with self._wake:
            if self.engine is None and self.down_reason:
                raise ApiError(503, f"the cluster is down: {self.down_reason}", "server_error", code="cluster_down")
            if len(self._queue) >= self.max_queue:
                self.metrics.finished("rejected")
                raise ApiError(
                    429, f"{len(self._queue)} requests are already waiting (--max-queue {self.max_queue})",
                    "rate_limit_error", code="queue_full",
                )  # fmt: skip
            self._queue.append(job)
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._running = False
            for job in self._queue:
                job.post(Failed(ApiError(503, "the server is shutting down", "server_error")))
            self._queue.clear()
            self._wake.notify()
        self._thread.join(timeout=30)
        if self.engine is not None:
            self.engine.close()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while self._running and not self._queue:
                    self._wake.wait()
                if not self._running:
                    return
                job = self._queue.popleft()
            if job.cancelled.is_set():
                self.metrics.finished("cancelled")
                continue
            self.active = 1
            try:
                self._run(job)
            finally:
                self.active = 0

    def _run(self, job: Job) -> None:
        """Run one job to its end; every failure becomes a ``Failed`` for that job only (the loop must survive)."""
        try:
            engine = self._engine()
            events = engine.generate(job.prompt_ids, job.config)
            try:
                for event in events:
                    job.post(event)
                    if isinstance(event, GenerationFinished):
                        self.metrics.finished("ok", event.stats)
                    elif job.cancelled.is_set():
                        self.metrics.finished("cancelled")
                        return
            finally:
                events.close()
        except PeerLostError as exc:
            log.warning("a stage was lost: %s; the engine is rebuilt for the next request", exc)
            self._fail(job, ApiError(503, f"a pipeline stage was lost: {exc}", "server_error", code="stage_lost"))
            self._drop_engine()
        except ApiError as exc:
            self._fail(job, exc)
        except HomespecError as exc:
            self._fail(job, ApiError(400, exc.message + (f" ({exc.hint})" if exc.hint else "")))
        except Exception as exc:  # a bug must fail one request, not the server
            log.exception("request failed")
            self._fail(job, ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))

    def _fail(self, job: Job, error: ApiError) -> None:
        self.metrics.finished("error")
        job.post(Failed(error))

    def _engine(self) -> Any:
        if self.engine is None:
            try:
                self.engine = self._make_engine()
                self.down_reason = None
            except HomespecError as exc:
                self.down_reason = exc.message
                raise ApiError(503, f"the cluster is down: {exc.message}", "server_error", code="cluster_down") from exc
        return self.engine

    def _drop_engine(self) -> None:
        engine, self.engine = self.engine, None
        try:
            engine.close()
        except Exception:  # the cluster is already broken; closing it is best effort
            log.exception("closing a broken engine")
