"""Several requests decoded at once (SpecPipe-DB, DESIGN §4.2): the engine's API for a server.

``Batch.add`` admits a request between steps; ``Batch.step`` advances every active request by one pipeline tick
and returns, per request, the events that tick produced (the same events ``Engine.generate`` yields, in the same
order, ending with a GenerationFinished, or a GenerationFailed when a stage failed that request alone); ``Batch.cancel``
drops a request and frees its KV. Each request has its
own draft source (taken from a pool per draft spec, so learned tables and loaded heads are reused), its own tree and
its own KV on every stage; the lossless contract holds per request whatever else is in the batch.

In mode ``ar`` the whole model is in this process and decodes one request at a time: a Batch there holds one.
Both kinds of decoder take the same calls (``backends.Decoder``: join, step, leave).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from homespec.config import GenerationConfig
from homespec.engine import Engine, RequestRun
from homespec.errors import ConfigError, RequestFailedError
from homespec.events import Event, GenerationFailed

if TYPE_CHECKING:
    from homespec.backends import Decoder


@dataclass
class _Item:
    req: int  # the decoder's request id
    run: RequestRun
    spec: str
    draft: Any


class Batch:
    def __init__(self, engine: Engine, max_active: int, mode: str | None = None) -> None:
        """A batch in ``mode`` (default: the engine's; pipelined modes share the engine's stages)."""
        self.engine = engine
        self.mode = mode or engine.options.mode
        serial = self.mode == "ar"
        self.max_active = 1 if serial else max_active
        if not (1 <= self.max_active <= engine.options.max_concurrency):
            raise ConfigError(
                f"{max_active} requests at once: this engine's stages hold at most {engine.options.max_concurrency}",
                hint="build the engine with a larger max_concurrency (serve --max-concurrency)",
            )
        self.decoder: Decoder = engine.decoder_for(self.mode)
        self.items: dict[int, _Item] = {}
        self._pool: dict[str, list[Any]] = {}
        self._ids = 0

    @property
    def active(self) -> int:
        return len(self.items)

    @property
    def has_room(self) -> bool:
        return len(self.items) < self.max_active

    @property
    def open_requests(self) -> int:
        """Requests whose KV is held on the stages (or in process) right now."""
        return int(self.decoder.open_requests)

    def add(self, prompt_ids: Sequence[int], config: GenerationConfig, draft: str | None = None) -> int:
        """Admit a request (its prompt goes into the pipeline now); returns its id in this batch."""
        if not self.has_room:
            raise ConfigError(f"the batch is full ({self.max_active} active requests)")
        engine, spec = self.engine, draft or self.engine.options.draft
        engine.check_fits(prompt_ids, config)  # before a draft is built for a request that cannot run
        pool = self._pool.setdefault(spec, [])
        source = pool.pop() if pool else engine.build_draft(spec)
        try:
            run, tree = engine.start_run(prompt_ids, config, self.mode, source)
            req = self.decoder.join(prompt_ids, source, config.sampling, tree, config.trace, config.max_tokens)
        except BaseException:
            pool.append(source)
            raise
        self._ids += 1
        self.items[self._ids] = _Item(req, run, spec, source)
        return self._ids

    def step(self) -> dict[int, list[Event]]:
        """One pipeline tick for every active request: the events of those that advanced. A request whose list
        ends with a GenerationFinished has left the batch."""
        by_req = {item.req: (i, item) for i, item in self.items.items()}
        out: dict[int, list[Event]] = {}
        for req, step in self.decoder.step():
            i, item = by_req[req]
            events = out.setdefault(i, [])
            if isinstance(step, RequestFailedError):  # the decoder has ended it on every stage already
                del self.items[i]
                self._pool.setdefault(item.spec, []).append(item.draft)
                events.append(GenerationFailed(step.message))
                continue
            events.extend(item.run.on_step(step))
            if item.run.done:
                self._release(i, stats=True)
                events.extend(item.run.finish(tuple(self.decoder.busy_fraction)))
        return out

    def cancel(self, i: int) -> None:
        """Drop a request now (its client went away): every stage frees its KV."""
        if i in self.items:
            self._release(i)

    def close(self) -> None:
        for i in list(self.items):
            self._release(i)

    def _release(self, i: int, stats: bool = False) -> None:
        item = self.items.pop(i)
        self.decoder.leave(item.req, stats=stats)
        self._pool.setdefault(item.spec, []).append(item.draft)
