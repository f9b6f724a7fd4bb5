"""The server's generation service: owns the engine and decodes on one thread of its own, so the HTTP event loop
never blocks on the model (DESIGN §8, §4.2).

A route turns a body into a ``Job`` (token ids, a GenerationConfig, a thread-safe ``post`` back to its event loop)
and submits it. Past ``max_queue`` waiting jobs the submit is refused (429). The thread admits waiting jobs into a
``Batch`` (up to ``max_concurrency`` decoding together, SpecPipe-DB; one at a time in mode ``ar``), advances it a
step at a time and posts every engine event to its job, or ``Failed``. A job whose client went away (``cancelled``)
leaves the batch at the next step, which frees its KV on every stage. A lost stage fails the jobs in flight (503);
the engine is rebuilt for the next job, and while it cannot be rebuilt every job gets a 503.
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
from homespec.events import GenerationFailed, GenerationFinished, StageUtilization
from homespec.server.metrics import Metrics
from homespec.server.openai import ApiError

log = logging.getLogger("homespec.server")

READMIT_EVERY_S = 5.0  # while idle, how often to ask whether a missing worker is back


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
    def __init__(
        self, make_engine: Callable[[], Any], metrics: Metrics, max_concurrency: int = 4, max_queue: int = 32
    ) -> None:
        self._make_engine = make_engine
        self.metrics = metrics
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self.batch: Any = None  # None while the engine is down (being rebuilt, or failing to)
        self._open_batch()  # fails here, before the server listens, when the model cannot load
        self.down_reason: str | None = None
        self._queue: deque[Job] = deque()
        self._jobs: dict[int, Job] = {}  # batch id -> job, for the requests decoding now
        self._wake = threading.Condition()
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="homespec-generation", daemon=True)
        metrics.gauges |= {
            "queue_length": lambda: len(self._queue),
            "requests_active": lambda: len(self._jobs),
            "requests_open_on_stages": self.open_on_stages,
            "pipeline_stages": self.stages,
        }

    def _open_batch(self) -> None:
        from homespec.batching import Batch

        self.batch = Batch(self._make_engine(), self.max_concurrency)

    @property
    def engine(self) -> Any:
        return self.batch.engine if self.batch is not None else None

    def fresh_tokenizer(self) -> Any:
        """A tokenizer for the HTTP event loop (the engine's own is used by the generation thread)."""
        return self.batch.engine.fresh_tokenizer()

    @property
    def down(self) -> bool:
        """The engine failed to rebuild: requests get 503 until one rebuild succeeds."""
        return self.batch is None and self.down_reason is not None

    def start(self) -> None:
        self._thread.start()

    def stages(self) -> int:
        """Stages the engine runs on now: 0 while it is down or being rebuilt (re-admission shows here)."""
        engine = self.engine
        return int(engine.stage_count(engine.options.mode)) if engine is not None else 0

    def open_on_stages(self) -> int:
        """Requests whose KV is held on the stages (or in the in-process decoder) right now."""
        batch = self.batch
        return int(batch.open_requests) if batch is not None else 0

    def submit(self, job: Job) -> None:
        with self._wake:
            if self.down:
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
        """Admit waiting jobs while the batch has room, advance the batch one step, deliver its events, drop the
        jobs whose clients left; sleep when there is nothing to do."""
        while True:
            with self._wake:
                idle = False
                while self._running and not self._queue and not self._jobs and not idle:
                    idle = not self._wake.wait(timeout=READMIT_EVERY_S)
                if not self._running:
                    return
            if idle and not self._queue:
                self._readmit()
                continue
            try:
                self._admit()
                if self._jobs:
                    self._step()
            except PeerLostError as exc:
                log.warning("a stage was lost: %s; the engine is rebuilt for the next request", exc)
                error = ApiError(503, f"a pipeline stage was lost: {exc}", "server_error", code="stage_lost")
                self._fail_all(error)
            except Exception as exc:  # a bug must fail the requests in flight, not the server
                log.exception("generation failed")
                self._fail_all(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))

    def _readmit(self) -> None:
        """Idle: when a worker the cluster lacks answers again (``Engine.outdated``), rebuild the engine around it
        now rather than at the next request (a request that arrives meanwhile waits in the queue)."""
        engine = self.engine
        try:
            if engine is None or not engine.outdated():
                return
            log.warning("a missing worker answers again: rebuilding the cluster")
            self.batch = None
            engine.close()
            self._open_batch()
            self.down_reason = None
        except HomespecError as exc:  # the next request tries again (and says why if it cannot)
            log.warning("rebuilding the cluster failed: %s", exc)
            self.batch, self.down_reason = None, None

    def _admit(self) -> None:
        while True:
            with self._wake:
                if not self._queue or (self.batch is not None and not self.batch.has_room):
                    return
                job = self._queue.popleft()
            if job.cancelled.is_set():
                self.metrics.finished("cancelled")
                continue
            try:
                batch = self._ready_batch()
                self._jobs[batch.add(job.prompt_ids, job.config)] = job
            except ApiError as exc:
                self._fail(job, exc)
            except PeerLostError:
                self._queue.appendleft(job)  # not this job's fault: fail the batch, retry it on a rebuilt engine
                raise
            except HomespecError as exc:
                self._fail(job, ApiError(400, exc.message + (f" ({exc.hint})" if exc.hint else "")))

    def _step(self) -> None:
        for i, events in self.batch.step().items():
            job = self._jobs[i]
            for event in events:
                if isinstance(event, GenerationFailed):  # this request's own fault: the others go on
                    del self._jobs[i]
                    self._fail(job, ApiError(500, event.message, "server_error", code="request_failed"))
                    break
                job.post(event)
                if isinstance(event, GenerationFinished):
                    self.metrics.finished("ok", event.stats)
                    del self._jobs[i]
                elif isinstance(event, StageUtilization):
                    self.metrics.busy = event.busy
        for i, job in list(self._jobs.items()):
            if job.cancelled.is_set():
                self.batch.cancel(i)
                del self._jobs[i]
                self.metrics.finished("cancelled")

    def _fail(self, job: Job, error: ApiError) -> None:
        self.metrics.finished("error")
        job.post(Failed(error))

    def _fail_all(self, error: ApiError) -> None:
        """The pipeline is broken: every request in it fails; the engine is rebuilt for the next one."""
        for job in self._jobs.values():
            self._fail(job, error)
        self._jobs.clear()
        engine, self.batch = self.engine, None
        try:
            engine.close()
        except Exception:  # the cluster is already broken; closing it is best effort
            log.exception("closing a broken engine")

    def _ready_batch(self) -> Any:
        if self.batch is None:
            try:
                self._open_batch()
                self.down_reason = None
            except HomespecError as exc:
                self.down_reason = exc.message
                raise ApiError(503, f"the cluster is down: {exc.message}", "server_error", code="cluster_down") from exc
        return self.batch
