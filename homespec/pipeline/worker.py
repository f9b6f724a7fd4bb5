"""A stage process: layers [a, b) of the target behind ZeroMQ sockets (DESIGN §4.1, §7).

Sockets: ``in`` (PULL, bound) receives waves from the previous stage or the head; ``out`` (PUSH) sends hidden
states to the next stage, or Results to the head from the last stage; ``control`` (SUB) receives Start, Prune,
Abort, Heartbeat and Shutdown broadcast by the head; ``report`` (PUSH to the head) carries pongs, stats and
failures.

Every step: receive a wave -> apply every prune it depends on (``prune_seq``) -> drop rows that are dead -> run the
surviving rows with the tree mask -> send on. The loop survives anything a peer sends: a malformed message is
logged, counted and dropped, and a failure inside one request becomes a ``Failure`` message for the head, not a
crash. The stage exits on Shutdown, or when its parent process is gone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("homespec.worker")

POLL_MS = 200


@dataclass
class _Request:
    cache: Any  # TreeKVCache
    sampling: Any  # SamplingConfig
    features: bool = False  # return hidden states with results
    prompt_top: bool = False  # return the top-k of prompt positions
    pruned_seq: int = 0
    dead: set[int] = field(default_factory=set)
    steps: int = 0
    rows: int = 0
    dropped: int = 0
    busy_s: float = 0.0


class StageWorker:
    def __init__(self, assign: Any, addresses: dict[str, str]) -> None:
        import torch
        import zmq

        from homespec.model.loader import resolve
        from homespec.model.stage import Stage, parse_dtype

        torch.set_num_threads(int(os.environ.get("HOMESPEC_STAGE_THREADS", "1")))
        torch.set_grad_enabled(False)
        self.assign = assign
        source = resolve(assign.model or None)
        self.stage = Stage(
            source, assign.layer_start, assign.layer_end, dtype=parse_dtype(assign.dtype), device=assign.device
        )
        self.first = assign.stage == 0
        self.last = assign.stage == assign.num_stages - 1
        self.requests: dict[int, _Request] = {}
        self.bad_messages = 0
        ctx = zmq.Context.instance()
        self.inp = ctx.socket(zmq.PULL)
        self.inp.bind(addresses["in"])
        self.out = ctx.socket(zmq.PUSH)
        self.out.connect(addresses["out"])
        self.control = ctx.socket(zmq.SUB)
        self.control.setsockopt(zmq.SUBSCRIBE, b"")
        self.control.connect(addresses["control"])
        self.report = ctx.socket(zmq.PUSH)
        self.report.connect(addresses["report"])
        for s in (self.out, self.report):
            s.setsockopt(zmq.LINGER, 2000)
            s.setsockopt(zmq.SNDHWM, 64)
        self.poller = zmq.Poller()
        self.poller.register(self.control, zmq.POLLIN)
        self.poller.register(self.inp, zmq.POLLIN)
        self._parent = os.getppid()
        self._running = True
        self._step: int | None = None  # emulation: the step being padded, its rows so far and when it began
        self._step_rows = 0
        self._step_started = 0.0

    # -- the loop ------------------------------------------------------------------------------------------
    def run(self) -> None:
        from homespec.core.messages import Heartbeat

        self._send(self.report, Heartbeat(sender=self.assign.stage, seq=0))  # ready
        while self._running:
            events = dict(self.poller.poll(POLL_MS))
            if not events and os.getppid() != self._parent:
                log.warning("stage %d: head process is gone; exiting", self.assign.stage)
                break
            if self.control in events:
                self._drain_control()
            if self.inp in events and self._running:
                msg = self._recv(self.inp)
                if msg is not None:
                    self._on_data(msg)

    def _recv(self, sock: Any) -> Any:
        from homespec.errors import TransportError
        from homespec.transport.codec import decode

        frames = sock.recv_multipart(copy=False)
        try:
            return decode(frames)
        except TransportError as exc:
            self.bad_messages += 1
            log.warning("stage %d: dropped a malformed message: %s", self.assign.stage, exc)
            return None

    def _send(self, sock: Any, msg: Any) -> None:
        from homespec.transport.codec import encode

        sock.send_multipart(encode(msg), copy=False)

    def _drain_control(self) -> None:
        import zmq

        while self.control.poll(0, zmq.POLLIN):
            msg = self._recv(self.control)
            if msg is not None:
                self._on_control(msg)

    def _on_control(self, msg: Any) -> None:
        from homespec.config import SamplingConfig
        from homespec.core import messages as m

        if isinstance(msg, m.Start):
            sampling = SamplingConfig(msg.temperature, msg.top_p, msg.top_k, msg.seed)
            cache = self.stage.new_cache(self.assign.max_context, self.assign.max_tree)
            self.requests[msg.request] = _Request(cache, sampling, msg.features, msg.prompt_top)
        elif isinstance(msg, m.Prune):
            req = self.requests.get(msg.request)
            if req is not None:
                self._guarded(msg.request, lambda: self._apply_prune(req, msg))
        elif isinstance(msg, m.Abort):
            req = self.requests.pop(msg.request, None)
            if req is not None:
                stats = m.StageStats(
                    self.assign.stage, msg.request, req.steps, req.busy_s, req.rows, req.dropped, self.bad_messages
                )
                self._send(self.report, stats)
        elif isinstance(msg, m.Heartbeat):
            self._send(self.report, m.Heartbeat(sender=self.assign.stage, seq=msg.seq))
        elif isinstance(msg, m.Shutdown):
            self._running = False
        else:
            self.bad_messages += 1

    def _apply_prune(self, req: _Request, msg: Any) -> None:
        req.dead.update(msg.dead)
        req.cache.commit(msg.committed, msg.dead)
        req.pruned_seq = max(req.pruned_seq, msg.seq)

    def _on_data(self, msg: Any) -> None:
        from homespec.core.messages import Wave

        if not isinstance(msg, Wave):
            self.bad_messages += 1
            return
        req = self.requests.get(msg.request)
        if req is None:
            return  # aborted or finished: drop quietly
        while req.pruned_seq < msg.prune_seq and self._running and msg.request in self.requests:
            if self.control.poll(POLL_MS):
                self._drain_control()
        if msg.request in self.requests:
            self._guarded(msg.request, lambda: self._compute(req, msg))

    def _guarded(self, request: int, fn: Any) -> None:
        from homespec.core.messages import Failure

        try:
            fn()
        except Exception as exc:  # one request's failure must not kill the stage
            log.exception("stage %d: request %d failed", self.assign.stage, request)
            self.requests.pop(request, None)
            self._send(self.report, Failure(self.assign.stage, request, f"{type(exc).__name__}: {exc}"))

    # -- computing -----------------------------------------------------------------------------------------
    def _compute(self, req: _Request, msg: Any) -> None:
        from homespec.core.tree import WaveRow
        from homespec.pipeline.frames import from_raw

        started = time.perf_counter()
        x = from_raw(msg.data, self.stage.device)  # [n] tokens or [n, hidden]
        if msg.prefix:
            out = self.stage.forward_prefix(req.cache, x, msg.positions)
            rows = []
        else:
            keep = []
            for i, (node, parent) in enumerate(zip(msg.nodes, msg.parents, strict=True)):
                if node in req.dead or parent in req.dead:
                    req.dead.add(node)
                else:
                    keep.append(i)
            req.dropped += len(msg.nodes) - len(keep)
            if len(keep) < len(msg.nodes):
                x = x[keep]
            rows = [WaveRow(msg.nodes[i], msg.parents[i], 0, msg.positions[i]) for i in keep]  # type: ignore[arg-type]
            out = self.stage.forward_tree(req.cache, rows, x) if rows else x
        reply = self._result(req, msg, out, rows) if self.last else self._wave(msg, out, rows)
        computed = len(msg.positions) if msg.prefix else len(rows)
        req.steps += 1
        req.rows += computed
        first_of_step = self._emulate_stage(started, computed, None if msg.prefix else msg.step)
        req.busy_s += time.perf_counter() - started
        self._emulate_link(0 if self.last else computed, first_of_step)
        self._send(self.out, reply)

    def _wave(self, msg: Any, out: Any, rows: list[Any]) -> Any:
        """The hidden states of the surviving rows, for the next stage."""
        from homespec.core.messages import Wave
        from homespec.pipeline.frames import to_raw

        if msg.prefix:
            return Wave(msg.request, msg.step, True, msg.prune_seq, msg.nodes, msg.parents, msg.positions, to_raw(out))
        nodes = tuple(r.node for r in rows)
        parents = tuple(r.parent for r in rows)
        positions = tuple(r.position for r in rows)
        return Wave(msg.request, msg.step, False, msg.prune_seq, nodes, parents, positions, to_raw(out))

    def _result(self, req: _Request, msg: Any, logits: Any, rows: list[Any]) -> Any:
        """Last stage: per row the next token (greedy or keyed draw) and the top-k; for a prefix chunk only the
        top-k of every position, when asked (token recycling learns from the prompt)."""
        from homespec.core.messages import Result
        from homespec.model.sampling import RESULT_TOP_K, next_tokens, top_logprobs
        from homespec.pipeline.frames import to_raw

        if rows or (msg.prefix and req.prompt_top):
            top_t, top_lp = top_logprobs(logits)
        else:
            top_t, top_lp = logits.new_zeros((0, RESULT_TOP_K)).long(), logits.new_zeros((0, RESULT_TOP_K))
        hidden = self.stage.last_hidden if req.features and (msg.prefix or rows) else None
        h = to_raw(hidden.float()) if hidden is not None else to_raw(logits.new_zeros((0,)).float())
        t, lp = to_raw(top_t.long()), to_raw(top_lp.float())
        if msg.prefix:
            return Result(msg.request, msg.step, (), (), t, lp, h)
        tokens = next_tokens(logits, [r.position for r in rows], req.sampling) if rows else []
        return Result(msg.request, msg.step, tuple(r.node for r in rows), tuple(tokens), t, lp, h)

    def _emulate_stage(self, started: float, rows: int, step: int | None) -> bool:
        """Pad to the modeled device time. The waves of several requests that share a step (same ``step``, one
        after another) are one batch on the modeled device: together they take max(base, per-row * all rows), so
        the first pays the base and the later ones only their rows beyond it. Returns whether this wave opened a
        step (prompt chunks always do)."""
        a = self.assign
        first = step is None or step != self._step
        if first:
            self._step, self._step_rows, self._step_started = step, 0, started
        self._step_rows += rows
        modeled = max(a.emu_base_ms, a.emu_ms_per_row * self._step_rows) / 1000
        left = self._step_started + modeled - time.perf_counter()
        if left > 0:
            time.sleep(left)
        return first

    def _emulate_link(self, rows: int, first_of_step: bool = True) -> None:
        """The link's latency once per step, its bandwidth per row."""
        latency = self.assign.emu_link_ms if first_of_step else 0.0
        delay = (latency + self.assign.emu_link_ms_per_row * rows) / 1000
        if delay > 0:
            time.sleep(delay)


def main(argv: list[str] | None = None) -> None:
    """Entry point of a local stage process: ``python -m homespec.pipeline.worker --assign JSON --addresses JSON``."""
    from homespec.core.messages import Assign

    parser = argparse.ArgumentParser()
    parser.add_argument("--assign", required=True)
    parser.add_argument("--addresses", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("HOMESPEC_LOG", "WARNING").upper(), format="%(levelname)s %(message)s")
    assign = Assign(**json.loads(args.assign))
    worker = StageWorker(assign, json.loads(args.addresses))
    worker.run()
    sys.exit(0)


if __name__ == "__main__":
    main()
