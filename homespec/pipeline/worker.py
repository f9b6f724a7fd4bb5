"""A stage process: layers [a, b) of the target behind ZeroMQ sockets (DESIGN §4.1, §7).

Sockets: ``in`` (PULL, bound) receives waves from the previous stage or the head; ``out`` (PUSH) sends hidden
states to the next stage, or Results to the head from the last stage; ``control`` (SUB) receives Start, Prune,
Abort, Heartbeat and Shutdown broadcast by the head; ``report`` (PUSH to the head) carries pongs, stats and
failures.

Every step: receive a wave (the rows of every active request, SpecPipe-DB) -> apply every prune each request's rows
depend on (``prune_seqs``) -> drop rows that are dead -> run the surviving rows of all requests as one forward, each
request attending over its own KV with its tree mask -> send on one wave (or, from the last stage, one Result per
request). The loop survives anything a peer sends: a malformed message is
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
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from homespec.core.messages import Assign

log = logging.getLogger("homespec.worker")

POLL_MS = 200
LINGER_MS = 2000  # what ``out`` and ``report`` still hold when the stage closes is sent within this, or dropped
START_WAIT_S = 3.0  # a wave may overtake its request's Start (two sockets); longer means the Start never comes
PRUNE_WAIT_S = 10.0  # a wave's prunes are broadcast before it; longer means they never come: the request fails
AHEAD = 64  # how far a wave's request id or prune seq may run ahead of what the stage has seen, else it is bogus
DISTRUST_S = 60.0  # after a Start or prune that never came, no wait for this long: a peer that lies gets no stalls
#: a prune names at most the tree's nodes in this stage's cache plus as many whose rows are still upstream (dead
#: ids it remembers until they arrive): ``PRUNE_TREES`` trees' worth of ids; a longer one is a lie
PRUNE_TREES = 2
UNSEEN_TREES = 4  # dead ids still upstream kept per request: a few prunes' worth, then the oldest are forgotten
CONTROL_MAX_BYTES = 8 << 20  # libzmq drops a bigger control message before it is allocated
NO_TAPS = "this request's draft reads an EAGLE-3 head's features, and the stages were started without its taps"


@dataclass
class _Request:
    cache: Any  # TreeKVCache
    sampling: Any  # SamplingConfig
    features: bool = False  # return hidden states with results
    prompt_top: bool = False  # return the top-k of prompt positions
    taps: bool = False  # features are EAGLE-3's fc sum (the stages' taps) in place of the last hidden states
    pruned_seq: int = 0
    # dead ids this stage has not seen yet (their wave is still upstream), by the prune that named them: a wave sent
    # at prune seq s holds no node of prunes <= s, so those are forgotten once a wave at s or later arrives
    unseen_dead: deque[tuple[int, frozenset[int]]] = field(default_factory=deque)
    steps: int = 0
    rows: int = 0
    dropped: int = 0
    busy_s: float = 0.0


class StageWorker:
    def __init__(self, assign: Assign, addresses: dict[str, Any], parent: int | None = None) -> None:
        """``parent``: the pid of the process that started this stage (default: its parent now); the stage exits
        once that one is gone (``_orphaned``). Given by the starter, so that one dying while the stage still loads
        its weights is noticed too (a parent read after the load would already be init's)."""
        self._parent = os.getppid() if parent is None else parent
        import torch
        import zmq

        from homespec.core.step import PREFIX_CHUNK
        from homespec.model.loader import resolve
        from homespec.model.stage import Stage, parse_dtype

        torch.set_num_threads(int(os.environ.get("HOMESPEC_STAGE_THREADS", "1")))
        torch.set_grad_enabled(False)
        self.assign = assign
        source = resolve(assign.model or None)
        self.stage = Stage(
            source,
            assign.layer_start,
            assign.layer_end,
            dtype=parse_dtype(assign.dtype),
            device=assign.device,
            weights=assign.weights,
            taps=_taps(assign, source),
        )
        self.first = assign.stage == 0
        self.last = assign.stage == assign.num_stages - 1
        self.requests: dict[int, _Request] = {}
        self.max_requests = _request_cap(assign, self.stage, local="curve" not in addresses)
        self.bad_messages = 0  # undecodable, wrong for its socket, or refused (hostile input is counted, not obeyed)
        # the largest wave: max(tree rows, a prompt chunk) of hidden states in fp32 (capped before allocation)
        self.max_bytes = max(assign.max_tree, PREFIX_CHUNK) * self.stage.hidden * 4 * (2 if assign.taps else 1)
        self.max_bytes += 1 << 20
        ctx: zmq.Context[Any] = zmq.Context.instance()
        curve = _CurveSetup(ctx, addresses["curve"]) if "curve" in addresses else None
        self._ctx, self._curve = ctx, curve
        self.inp = ctx.socket(zmq.PULL)
        self.inp.setsockopt(zmq.MAXMSGSIZE, self.max_bytes + (4 << 20))  # tensors + the header cap
        if curve:
            curve.server(self.inp)
        self.inp.bind(addresses["in"])
        self.out = ctx.socket(zmq.PUSH)
        self.control = ctx.socket(zmq.SUB)
        self.control.setsockopt(zmq.SUBSCRIBE, b"")
        self.control.setsockopt(zmq.MAXMSGSIZE, CONTROL_MAX_BYTES)
        self.report = ctx.socket(zmq.PUSH)
        for sock, name in ((self.out, "out"), (self.control, "control"), (self.report, "report")):
            if curve:
                curve.client(sock, name)
            sock.connect(addresses[name])
        for s in (self.out, self.report):
            s.setsockopt(zmq.LINGER, LINGER_MS)
            s.setsockopt(zmq.SNDHWM, 64)
        self.poller = zmq.Poller()
        self.poller.register(self.control, zmq.POLLIN)
        self.poller.register(self.inp, zmq.POLLIN)
        self._running = True
        self.busy_total = 0.0  # seconds spent on steps (emulated: padded to the modeled time), sent with every wave
        self._newest = 0  # the highest request id started: ids grow, so a higher one's Start is still on its way
        self._distrust_until = 0.0  # a wait timed out (something lied): until then, nothing is waited for

    # -- the loop ------------------------------------------------------------------------------------------
    def run(self) -> None:
        from homespec.core.messages import Failure, Heartbeat

        digest = self.stage.source.digest(self.assign.weights) if self.assign.model_digest else ""
        if digest != self.assign.model_digest:
            reason = f"this copy of {self.assign.model or 'the model'} differs from the head's (digest {digest})"
            log.error("stage %d: %s", self.assign.stage, reason)
            self._send(self.report, Failure(self.assign.stage, 0, reason))
            return
        ready = Heartbeat(sender=self.assign.stage, seq=0, weight_bytes=self.stage.weight_bytes)
        self._send(self.report, ready)
        while self._running:
            events = dict(self.poller.poll(POLL_MS))
            if not events and self._orphaned():
                break
            if self.control in events:
                self._drain_control()
            if self.inp in events and self._running:
                msg = self._recv(self.inp)
                if msg is not None:
                    self._on_data(msg)

    def close(self) -> None:
        """Close every socket, once what ``out`` and ``report`` still hold is sent (their linger), and the context:
        after this the process may end without the interpreter's teardown (``launcher._run_stage``)."""
        if self._curve is not None:
            self._curve.gatekeeper.stop()
        self._ctx.destroy(linger=LINGER_MS)

    def _orphaned(self) -> bool:
        """The process that started this stage is gone: stop (a head that died mid-request sends no Shutdown)."""
        if os.getppid() != self._parent:
            log.warning("stage %d: head process is gone; exiting", self.assign.stage)
            self._running = False
        return not self._running

    def _recv(self, sock: Any) -> Any:
        from homespec.errors import TransportError
        from homespec.transport.codec import decode

        frames = sock.recv_multipart(copy=False)
        try:
            return decode(frames, self.max_bytes)
        except TransportError as exc:
            self.bad_messages += 1
            if self.bad_messages <= 10 or self.bad_messages % 1000 == 0:  # a flood must not flood the log too
                log.warning("stage %d: dropped malformed message %d: %s", self.assign.stage, self.bad_messages, exc)
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
            if msg.request not in self.requests and len(self.requests) >= self.max_requests:
                self.bad_messages += 1  # a flood of Starts would allocate KV for each: refused past the cap
                log.warning("stage %d: refused request %d: %d open", self.assign.stage, msg.request, len(self.requests))
                self._send(self.report, m.Failure(self.assign.stage, msg.request, "too many open requests"))
                return
            self._newest = max(self._newest, msg.request)
            sampling = SamplingConfig(msg.temperature, msg.top_p, msg.top_k, msg.seed)
            if msg.taps and not self.assign.taps:  # its draft would read features nobody adds up: said, not run
                self._send(self.report, m.Failure(self.assign.stage, msg.request, NO_TAPS))
                return
            cache = self.stage.new_cache(self.assign.max_context, self.assign.max_tree)
            self.requests[msg.request] = _Request(cache, sampling, msg.features, msg.prompt_top, taps=msg.taps)
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
            self._send(self.report, m.Heartbeat(self.assign.stage, msg.seq, self.bad_messages))
        elif isinstance(msg, m.Shutdown):
            self._running = False
        else:
            self.bad_messages += 1

    def _apply_prune(self, req: _Request, msg: Any) -> None:
        """Commit and free what the cache holds; remember (bounded) the dead ids whose rows are still upstream. A
        prune longer than the tree can be, or older than one applied, is a lie: counted and dropped."""
        if len(msg.committed) + len(msg.dead) > PRUNE_TREES * self.assign.max_tree or msg.seq <= req.pruned_seq:
            self.bad_messages += 1
            return
        cache = req.cache
        unseen = frozenset(d for d in msg.dead if d not in cache.slot_of and d not in cache.committed)
        cache.commit(msg.committed, msg.dead)
        req.pruned_seq = msg.seq
        if unseen:
            req.unseen_dead.append((msg.seq, unseen))
            while sum(len(ids) for _, ids in req.unseen_dead) > UNSEEN_TREES * self.assign.max_tree:
                req.unseen_dead.popleft()  # only a lying head names this many nodes it never sent

    def _on_data(self, msg: Any) -> None:
        from homespec.core.messages import Wave

        if not isinstance(msg, Wave):
            self.bad_messages += 1
            return
        if any(r > self._newest + AHEAD for r in msg.requests):
            self.bad_messages += 1  # request ids grow one by one: a wave this far ahead of every Start is bogus
            return
        for request, seq, _, _ in msg.segments():  # every prune each request's rows depend on, applied first
            if request > self._newest and not self._await_start(request):
                self.bad_messages += 1  # its Start never came
                return
            req = self.requests.get(request)
            if req is not None and seq > req.pruned_seq + AHEAD:
                self.bad_messages += 1
                return
            if req is not None and req.pruned_seq < seq and not self._await_prunes(request, seq):
                return
        if not any(r in self.requests for r in msg.requests):
            return  # aborted or finished: drop quietly
        if msg.prefix:
            self._guarded(msg.requests[0], lambda: self._compute_prefix(self.requests[msg.requests[0]], msg))
        else:
            try:
                self._compute(msg)
            except Exception as exc:  # the batch's forward failed: every request in it fails, the stage lives
                for request in msg.requests:
                    self._fail(request, exc)

    def _await_prunes(self, request: int, seq: int) -> bool:
        """Read control until ``request``'s prunes up to ``seq`` are applied (False: the stage is stopping). After
        PRUNE_WAIT_S the prunes are not coming: the request fails (the head, if real, hears why)."""
        deadline = time.monotonic() + (0.0 if time.monotonic() < self._distrust_until else PRUNE_WAIT_S)
        req = self.requests.get(request)
        while req is not None and req.pruned_seq < seq and self._running:
            if time.monotonic() >= deadline:
                self._distrust_until = time.monotonic() + DISTRUST_S
                self._fail(request, TimeoutError(f"prune {seq} never came (applied: {req.pruned_seq})"))
                return True
            if self.control.poll(POLL_MS):
                self._drain_control()
            elif self._orphaned():
                return False
            req = self.requests.get(request)
        return self._running

    def _await_start(self, request: int) -> bool:
        """A wave of a request whose Start (on the control socket) has not been read yet: read control until it
        is (the head sends Start first, but two sockets keep no order between them), for at most START_WAIT_S.
        False if it never came (and, for DISTRUST_S after, no more waiting: the next such wave is dropped at once)."""
        now = time.monotonic()
        deadline = now + (0.0 if now < self._distrust_until else START_WAIT_S)
        while request > self._newest and self._running and time.monotonic() < deadline:
            if self.control.poll(POLL_MS):
                self._drain_control()
            elif self._orphaned():
                return False
        if request > self._newest:
            self._distrust_until = time.monotonic() + DISTRUST_S
            return False
        return True

    def _guarded(self, request: int, fn: Any) -> None:
        try:
            fn()
        except Exception as exc:  # one request's failure must not kill the stage
            self._fail(request, exc)

    def _fail(self, request: int, exc: Exception) -> None:
        from homespec.core.messages import Failure

        if self.requests.pop(request, None) is None:
            return
        log.error("stage %d: request %d failed", self.assign.stage, request, exc_info=exc)
        self._send(self.report, Failure(self.assign.stage, request, f"{type(exc).__name__}: {exc}"))

    # -- computing -----------------------------------------------------------------------------------------
    def _compute_prefix(self, req: _Request, msg: Any) -> None:
        from homespec.core.messages import Wave
        from homespec.pipeline.frames import from_raw, to_raw

        started = time.perf_counter()
        carry = from_raw(msg.carry, self.stage.device) if msg.carry.shape != (0,) else None
        out = self.stage.forward_prefix(req.cache, from_raw(msg.data, self.stage.device), msg.positions, carry)
        n = len(msg.positions)
        busy = (*msg.busy_s, self.busy_total + self._step_s(started, n))
        if self.last:
            reply = self._result(req, msg.requests[0], msg.step, out, [], prefix=True, busy=busy)
        else:
            reply = Wave(
                msg.step, True, msg.requests, msg.counts, msg.prune_seqs, (), (), msg.positions, to_raw(out), busy,
                carry=self._carry_out(),
            )  # fmt: skip
        req.steps += 1
        req.rows += n
        req.busy_s += self._emulate_stage(started, n)
        self._emulate_link(0 if self.last else n)
        self._send(self.out, reply)

    def _compute(self, msg: Any) -> None:
        """One step's tree wave, all requests in it as one forward: drop the dead rows, reserve each request's
        slots (a request that cannot is failed alone), run, and send on one Wave or one Result per request."""
        import torch

        from homespec.core.messages import Wave
        from homespec.core.tree import WaveRow
        from homespec.pipeline.frames import from_raw, to_raw

        started = time.perf_counter()
        x = from_raw(msg.data, self.stage.device)  # [n] tokens or [n, hidden]
        carry = from_raw(msg.carry, self.stage.device) if msg.carry.shape != (0,) else None  # [n, hidden] fp32
        parts: list[tuple[int, int, _Request, list[Any], list[int]]] = []  # request, seq, state, rows, rows in x
        for request, seq, lo, hi in msg.segments():
            req = self.requests.get(request)
            if req is None:
                continue  # aborted, or failed here before
            while req.unseen_dead and req.unseen_dead[0][0] <= seq:
                req.unseen_dead.popleft()  # this wave and every later one were sent after those prunes
            dead = set().union(*(ids for _, ids in req.unseen_dead))
            keep = []
            for i in range(lo, hi):
                if msg.nodes[i] in dead or msg.parents[i] in dead:
                    dead.add(msg.nodes[i])  # a row of a dead subtree: its children in this wave are dead too
                else:
                    keep.append(i)
            req.dropped += hi - lo - len(keep)
            rows = [WaveRow(msg.nodes[i], msg.parents[i], 0, msg.positions[i]) for i in keep]  # type: ignore[arg-type]
            parts.append((request, seq, req, rows, keep))
        segments, index, live = [], [], []
        for request, seq, req, rows, keep in parts:
            if rows:
                try:
                    segments.append(self.stage.segment(req.cache, rows))
                except Exception as exc:  # failed alone (e.g. its cache is full)
                    self._fail(request, exc)
                    continue
            index.extend(keep)
            live.append((request, seq, req, rows))
        n = len(index)
        if n:
            pick = None if n == x.shape[0] else torch.tensor(index, device=x.device)
            sel = x if pick is None else x[pick]
            if carry is not None and pick is not None:
                carry = carry[pick]
            out = self.stage.forward_batch(segments, sel, [msg.positions[i] for i in index], carry)
        else:
            out = x[:0]
            self.stage.last_carry = None  # no rows ran: nothing to carry (not the last call's sum)
        busy = (*msg.busy_s, self.busy_total + self._step_s(started, n))
        replies, at = [], 0
        ahead: dict[str, list[int]] = {
            k: [] for k in ("requests", "counts", "prune_seqs", "nodes", "parents", "positions")
        }
        for request, seq, req, rows in live:
            k = len(rows)
            if self.last:
                features = self.stage.features(req.taps)
                hidden = features[at : at + k] if k and features is not None else None
                replies.append(self._result(req, request, msg.step, out[at : at + k], rows, hidden=hidden, busy=busy))
            else:
                ahead["requests"].append(request)
                ahead["counts"].append(k)
                ahead["prune_seqs"].append(seq)
                ahead["nodes"].extend(r.node for r in rows)
                ahead["parents"].extend(r.parent for r in rows)
                ahead["positions"].extend(r.position for r in rows)
            req.steps += 1
            req.rows += k
            at += k
        if not self.last:
            replies.append(
                Wave(
                    step=msg.step,
                    prefix=False,
                    requests=tuple(ahead["requests"]),
                    counts=tuple(ahead["counts"]),
                    prune_seqs=tuple(ahead["prune_seqs"]),
                    nodes=tuple(ahead["nodes"]),
                    parents=tuple(ahead["parents"]),
                    positions=tuple(ahead["positions"]),
                    data=to_raw(out),
                    busy_s=busy,
                    carry=self._carry_out(),
                )
            )
        took = self._emulate_stage(started, n)
        for _, _, req, _ in live:
            req.busy_s += took  # the stage was busy for each request in the step
        self._emulate_link(0 if self.last else n)
        for reply in replies:
            self._send(self.out, reply)

    def _carry_out(self) -> Any:
        """The running EAGLE-3 fc sum after this stage's last call, for the next stage (``[0]`` when none)."""
        from homespec.core.messages import NO_TENSOR
        from homespec.pipeline.frames import to_raw

        carry = self.stage.last_carry
        return NO_TENSOR if carry is None else to_raw(carry)

    def _result(
        self,
        req: _Request,
        request: int,
        step: int,
        logits: Any,
        rows: list[Any],
        prefix: bool = False,
        hidden: Any = None,
        busy: tuple[float, ...] = (),
    ) -> Any:
        """Last stage: per row the next token (greedy or keyed draw) and the top-k; for a prefix chunk only the
        top-k of every position, when asked (token recycling learns from the prompt)."""
        from homespec.core.messages import RESULT_TOP_K, Result
        from homespec.model.sampling import next_tokens, top_logprobs
        from homespec.pipeline.frames import to_raw

        tokens = next_tokens(logits, [r.position for r in rows], req.sampling) if rows else []
        chosen: list[float] = []
        if rows or (prefix and req.prompt_top):
            top_t, top_lp, chosen = top_logprobs(logits, chosen=tokens)
        else:
            top_t, top_lp = logits.new_zeros((0, RESULT_TOP_K)).long(), logits.new_zeros((0, RESULT_TOP_K))
        if prefix:
            hidden = self.stage.features(req.taps)
        hidden = hidden if req.features and (prefix or rows) else None
        h = to_raw(hidden.float()) if hidden is not None else to_raw(logits.new_zeros((0,)).float())
        t, lp = to_raw(top_t.long()), to_raw(top_lp.float())
        nodes = () if prefix else tuple(r.node for r in rows)
        return Result(
            request=request,
            step=step,
            nodes=nodes,
            next_tokens=() if prefix else tuple(tokens),
            top_tokens=t,
            top_logprobs=lp,
            hidden=h,
            next_logprobs=() if prefix else tuple(chosen),
            busy_s=busy,
        )

    def _modeled_s(self, rows: int) -> float:
        a = self.assign
        return (max(a.emu_base_ms, a.emu_ms_per_row * rows) + a.emu_overhead_ms) / 1000

    def _step_s(self, started: float, rows: int) -> float:
        """How long the step begun at ``started`` takes: its compute so far, or the modeled time when longer."""
        return max(time.perf_counter() - started, self._modeled_s(rows))

    def _emulate_stage(self, started: float, rows: int) -> float:
        """Pad to the modeled device time of a step of ``rows`` rows (all requests' rows are one batch); count
        the step's seconds in ``busy_total`` and return them."""
        left = started + self._modeled_s(rows) - time.perf_counter()
        if left > 0:
            time.sleep(left)
        took = time.perf_counter() - started
        self.busy_total += took
        return took

    def _emulate_link(self, rows: int) -> None:
        """The link's latency, and its bandwidth per row."""
        delay = (self.assign.emu_link_ms + self.assign.emu_link_ms_per_row * rows) / 1000
        if delay > 0:
            time.sleep(delay)


def _taps(assign: Any, source: Any) -> dict[int, Any] | None:
    """The share of an EAGLE-3 head's fc this stage adds up (``Assign.taps``; model/eagle.py), or None."""
    if not assign.taps:
        return None
    from types import SimpleNamespace

    from homespec.model.eagle import tap_weights

    # config.json as parsed, as the stage reads it: transformers' config would import transformers (~1.5 s a stage)
    target = SimpleNamespace(**source.raw)
    return tap_weights(assign.taps, target, assign.layer_start, assign.layer_end)


def _request_cap(assign: Any, stage: Any, local: bool) -> int:
    """How many requests may be open here at once: ``Assign.max_requests`` (the head's concurrency), and no more
    than the KV caches (``max_context + max_tree`` slots each) that 90% of the device's free memory holds, shared by
    the stages of a local cluster. Never below 1: a stage that cannot hold one request fails it with CapacityError."""
    import torch

    slots = assign.max_context + assign.max_tree
    element = torch.empty((), dtype=stage.dtype).element_size()
    per_request = 2 * len(stage.layers) * stage.kv_heads * stage.head_dim * slots * element
    if str(stage.device).startswith("cuda"):
        free = torch.cuda.mem_get_info(torch.device(stage.device))[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    share = free * 0.9 / (assign.num_stages if local else 1)
    cap = max(1, min(int(assign.max_requests), int(share // per_request)))
    log.info("stage %d: at most %d open requests (%.0f MB of KV each)", assign.stage, cap, per_request / 1e6)
    return cap


class _CurveSetup:
    """A remote stage's CurveZMQ (transport/channel.py): its input admits only ``allow`` (the previous stage's
    worker key, or the head's), and it connects with its worker's key pair to servers whose keys it was given."""

    def __init__(self, ctx: Any, spec: dict[str, Any]) -> None:
        from homespec.transport.channel import Gatekeeper
        from homespec.transport.keys import load_or_create

        self.keys = load_or_create("worker")
        self.server_keys = {"out": spec["out_key"], "control": spec["head_key"], "report": spec["head_key"]}
        allow = frozenset(spec["allow"])
        self.gatekeeper = Gatekeeper(ctx)
        self.gatekeeper.allow("stage", lambda: allow)

    def server(self, sock: Any) -> None:
        from homespec.transport.channel import curve_server

        curve_server(sock, self.keys, "stage")

    def client(self, sock: Any, name: str) -> None:
        from homespec.transport.channel import curve_client

        curve_client(sock, self.keys, self.server_keys[name])


def main(argv: list[str] | None = None) -> None:
    """Entry point of a local stage process: ``python -m homespec.pipeline.worker --assign JSON --addresses JSON
    [--parent PID]``."""
    from homespec.core.messages import Assign

    parser = argparse.ArgumentParser()
    parser.add_argument("--assign", required=True)
    parser.add_argument("--addresses", required=True)
    parser.add_argument("--parent", type=int, default=None, help="pid of the starter: exit when it is gone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("HOMESPEC_LOG", "WARNING").upper(), format="%(levelname)s %(message)s")
    assign = Assign(**json.loads(args.assign))
    worker = StageWorker(assign, json.loads(args.addresses), args.parent)
    try:
        worker.run()
    finally:
        worker.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
