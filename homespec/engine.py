"""The one public API that ``cli/``, ``server/`` and ``tui/`` use: load a model once, then
``generate(prompt_ids, config)`` yields typed events (``homespec.events``) as tokens are committed.

The engine owns the tokenizer, the draft sources and the stop rules (EOS, max tokens); decoding itself is done by a
decoder of its backend (``backends.py``: in process, or over stage processes here or on workers). It reads the clock
only to report wall time.
"""

from __future__ import annotations

import functools
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from homespec.config import GenerationConfig, Mode, TreeConfig, default_tree
from homespec.core.messages import DEFAULT_MAX_REQUESTS
from homespec.core.step import DEFAULT_BY_SCORE, DecodeStep
from homespec.core.stops import find_stop, held_back
from homespec.errors import ConfigError, DraftError
from homespec.events import (
    Event,
    FinishReason,
    GenerationFinished,
    GenerationStats,
    StageInfo,
    StageUtilization,
    StepCompleted,
    TokenLogprob,
    TokensCommitted,
    TreeNodeView,
    TreeSnapshot,
)

if TYPE_CHECKING:
    from homespec.backends import Backend, Decoder
    from homespec.model.stage import Stage

IMPLEMENTED_MODES: tuple[Mode, ...] = ("ar", "pp", "tree", "specpipe")


@dataclass(frozen=True)
class EngineOptions:
    """How to build an engine; checked on construction (a ConfigError names the bad option)."""

    model: str | None = None  # None: the bundled SmolLM2-135M-Instruct
    draft: str = "none"
    mode: Mode = "ar"
    dtype: str = "fp32"
    weights: str = "auto"  # the linear weights' format (model/formats.py): auto, fp32, fp16, bf16, int8, int4
    device: str = "cpu"
    max_context: int = 4096
    tree: TreeConfig = TreeConfig()
    split: int = 1  # in-process stages (same math, for tests of stage equivalence)
    stages: int = 1  # stage processes for the pipelined modes
    wave_size: int = 0  # specpipe: nodes injected per step (0: the model's, ``planner.default_wave_rows``)
    by_score: bool = DEFAULT_BY_SCORE  # specpipe: FlowSpec score-ordered waves (False: SpecPipe depth layers)
    emulate: str | None = None  # a profile (profiles/*.json): pad stages and links to its modeled times
    time_scale: float = 0.0  # emulation: run the modeled clock this many times slower (0: auto, pipeline/emulate.py)
    workers: tuple[str, ...] = ()  # remote stages on these workers (HOST:PORT, or "auto": browse the LAN)
    cluster: str | None = None  # remote stages as a profile names them (homespec profile --lan --save)
    peer_timeout_s: float = 10.0  # a stage or worker silent this long fails the request
    max_concurrency: int = DEFAULT_MAX_REQUESTS  # requests open on the stages at once (Assign.max_requests)
    # the EAGLE-3 head whose fc the stages add up (Assign.taps; model/eagle.py): set by the Engine from ``draft``
    # (``backends.eagle3_head``), once, before any stage loads; "" for every other draft
    taps: str = ""

    def __post_init__(self) -> None:
        if self.mode not in IMPLEMENTED_MODES:
            raise ConfigError(f"mode {self.mode!r} is not available here", hint=f"use {IMPLEMENTED_MODES}")
        if not (0 <= self.wave_size <= 64):
            raise ConfigError(f"wave size must be in [1, 64] (0: the model's), got {self.wave_size}")
        if not (1 <= self.max_concurrency <= 256):
            raise ConfigError(f"max concurrency must be in [1, 256], got {self.max_concurrency}")
        if not (1.0 <= self.peer_timeout_s <= 3600.0):
            raise ConfigError(f"--peer-timeout must be in [1, 3600] seconds, got {self.peer_timeout_s}")
        if not (0 <= self.time_scale <= 1000):
            raise ConfigError(f"time scale must be in [0, 1000] (0 = auto), got {self.time_scale}")
        if self.emulate and self.remote:
            raise ConfigError("--emulate runs local stages; it cannot be combined with --workers or --cluster")
        from homespec.model.formats import check_format

        check_format(self.weights, self.dtype)
        if self.split < 1 or self.stages < 1:
            raise ConfigError(f"split and stages must be at least 1, got {self.split} and {self.stages}")

    @property
    def remote(self) -> bool:
        return bool(self.workers or self.cluster)


class Engine:
    def __init__(self, options: EngineOptions = EngineOptions(), progress: Callable[[str], None] | None = None) -> None:
        """Load the model (and start the stage processes for a pipelined mode); ``progress`` hears each phase."""
        say = progress or (lambda text: None)
        self._say = say
        self._auto_said = False  # auto fell back from the shipped EAGLE-3 head once (the stages hold no taps for it)
        import torch

        from homespec.backends import build_backend
        from homespec.model.loader import resolve
        from homespec.model.stage import parse_dtype

        torch.set_grad_enabled(False)
        self.options = options
        self._dtype = parse_dtype(options.dtype)
        say(f"reading {options.model or 'the bundled model'}…")
        self.source = resolve(options.model)
        from homespec.model.formats import resolve_weights

        weights, notice = resolve_weights(self.source, options.weights, options.dtype, options.device)
        self.notice = notice  # what ``auto`` chose, where it matters: the CLIs print it once, on stderr
        if notice:
            say(notice)
        from homespec.core.planner import default_wave_rows

        wave = options.wave_size or default_wave_rows(self.source.shape)
        from homespec.backends import eagle3_head

        taps = eagle3_head(options.draft, self.source)
        self.options = options = replace(options, weights=weights, wave_size=wave, taps=taps)
        self.tokenizer = self.source.tokenizer()
        self.eos_ids = _eos_ids(self.source, self.tokenizer)
        self._closed = False
        self.backend: Backend = build_backend(self.source, options, say)
        try:
            self._drafts = {options.draft: self.build_draft(options.draft)}
        except BaseException:
            self.backend.close()
            raise

    @functools.cached_property
    def _auto_head(self) -> str:
        """The shipped EAGLE-3 head ``auto`` drafts with ("" if none), looked up once, on the first ``auto`` draft
        (an engine started with ``auto`` found it already: its stages' taps)."""
        from homespec.backends import eagle3_head

        return self.options.taps if self.options.draft == "auto" else eagle3_head("auto", self.source)

    def build_draft(self, spec: str) -> Any:
        """A new draft source ``spec`` for this engine's target (a batch gives each concurrent request its own)."""
        from homespec.model.drafts import build_draft

        o = self.options
        if spec == "auto" and not self._auto_said and (shipped := self._auto_head) and shipped != o.taps:
            # the stages hold another head's taps, or none: auto drafts without it (build_draft decides; said once)
            self._auto_said = True
            self._say(
                f"auto drafts with the EAGLE-1-style head: the stages were started without {shipped}'s taps "
                "(start the engine with --draft auto to draft with it)"
            )
        draft = build_draft(
            spec, self.source, self.tokenizer, o.tree, self._dtype, o.device, o.max_context, o.weights, o.taps
        )
        if draft.feature_taps:  # EAGLE-3: the stages add up one head's fc, the one the engine started with
            from homespec.backends import eagle3_head

            want = eagle3_head(spec, self.source)
            if want != o.taps:
                raise DraftError(
                    f"the EAGLE-3 head {want} needs the stages to add up its fc; they hold {o.taps or 'no head'}'s",
                    hint="start the engine (generate, serve) with that head as its draft: --draft eagle:PATH",
                )
        return draft

    def token_text(self, token: int) -> str:
        """One token's own text (cached; for displays)."""
        return str(self._token_text(token))

    @functools.cached_property
    def _token_text(self) -> Any:
        return functools.lru_cache(maxsize=1 << 16)(lambda t: str(self.tokenizer.decode([t])))

    def stage_info(self) -> list[StageInfo]:
        """What each stage is (for the TUI's stage pane): its device, layers and outgoing link latency; the modeled
        device and link when emulated. Mode ``ar``: the in-process stages."""
        return self.backend.stage_info()

    def stage_count(self, mode: str) -> int:
        """Stages a request of ``mode`` runs on: the cluster's (local or remote, as planned), or the split here."""
        return self.backend.stage_count(mode)

    def modeled_step_ms(self, rows: int = 1) -> float:
        """Emulated runs: the modeled time of one pipeline step (the slowest stage plus its outgoing link)."""
        return self.backend.modeled_step_ms(rows)

    def fresh_draft(self, spec: str) -> None:
        """Forget what the draft source ``spec`` learned (its recycling table, say): the next request that uses it
        starts cold. Benchmarks call this so that no mode profits from a table another mode warmed."""
        self._drafts[spec] = self.build_draft(spec)

    def clock_scale(self, mode: str) -> float:
        """Real seconds per reported second for ``mode``: the emulation's time scale, 1 for ``ar`` (never emulated)."""
        return self.backend.clock_scale(mode)

    def outdated(self) -> bool:
        """The cluster could be better now: a worker that was missing when it was built answers again (remote
        clusters; a local one never is). The server rebuilds the engine when this holds between requests."""
        return self.backend.outdated()

    def close(self) -> None:
        """Stop the stage processes (pipelined modes) and save draft state that has a file (``recycle:FILE``);
        the engine cannot generate afterwards."""
        if self._closed:
            return
        self._closed = True
        for d in self._drafts.values():
            d.save()
        self.backend.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def open_requests(self) -> int:
        """Requests whose KV is held right now, on the stages or in process (0 when the engine is idle)."""
        return self.backend.open_requests

    def fresh_tokenizer(self) -> Any:
        """A tokenizer of its own, for another thread (the server's event loop) than the one that decodes."""
        return self.source.tokenizer()

    @property
    def model_name(self) -> str:
        return self.source.name

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, prompt: str, chat: bool | None = None) -> list[int]:
        """Token ids for a prompt; with ``chat`` (default: when the tokenizer has a template) as a user turn."""
        use_chat = self.has_chat_template if chat is None else chat
        if use_chat:
            if not self.has_chat_template:
                raise ConfigError("this model's tokenizer has no chat template", hint="use --no-chat")
            return self.encode_messages([{"role": "user", "content": prompt}])
        ids = list(self.tokenizer(prompt)["input_ids"])
        if not ids:
            raise ConfigError("the prompt is empty")
        return ids

    def encode_messages(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return chat_ids(self.tokenizer, messages)

    @property
    def draft(self) -> Any:
        return self._drafts[self.options.draft]

    def decoder_for(self, mode: str) -> Decoder:
        """The decoder of ``mode`` (pipelined modes share this engine's stages)."""
        return self.backend.decoder(mode)

    def target_stages(self) -> list[Stage]:
        """The stages of mode ``ar`` (built on first use): the target in this process, for work beside decoding
        (``train-draft`` generates its data through them)."""
        from homespec.pipeline.inprocess import InProcessDecoder

        decoder = self.decoder_for("ar")
        if not isinstance(decoder, InProcessDecoder):
            raise ConfigError("mode ar does not run in this process here")
        return list(decoder.stages)

    def draft_for(self, spec: str | None) -> Any:
        """The engine's draft source ``spec`` (built on first use; default: the engine's own)."""
        spec = spec or self.options.draft
        if spec not in self._drafts:
            self._drafts[spec] = self.build_draft(spec)
        return self._drafts[spec]

    def generate(
        self,
        prompt_ids: Sequence[int],
        config: GenerationConfig | None = None,
        mode: Mode | None = None,
        draft: str | None = None,
    ) -> Iterator[Event]:
        """Stream events until EOS, a stop string or ``max_tokens``; the last event is a GenerationFinished.
        ``mode`` and ``draft`` override the engine's for this request (pipelined modes share the engine's stages)."""
        mode_name = mode or self.options.mode
        decoder, draft_source = self.decoder_for(mode_name), self.draft_for(draft)
        config = config or GenerationConfig()
        run, tree = self.start_run(prompt_ids, config, mode_name, draft_source)
        steps_iter = decoder.decode(prompt_ids, draft_source, config.sampling, tree, config.trace, config.max_tokens)
        try:
            for step in steps_iter:
                yield from run.on_step(step)
                if run.done:
                    break
        finally:
            steps_iter.close()  # ends the request on every stage (and frees its KV) now, also when abandoned
        yield from run.finish(tuple(decoder.busy_fraction))

    def start_run(
        self, prompt_ids: Sequence[int], config: GenerationConfig, mode: str, draft: Any
    ) -> tuple[RequestRun, TreeConfig]:
        """Everything a request needs before its decoder starts (alone or in a batch): the context check, the
        draft told the mode, the tree shape (the mode's and device's default unless the config names one) and the
        RequestRun that turns its steps into events."""
        self.check_fits(prompt_ids, config)
        draft.set_mode(mode)
        tree = config.tree or default_tree(mode, self.options.device)
        return RequestRun(self.run_context(mode), prompt_ids, config, mode, draft), tree

    def run_context(self, mode: str) -> RunContext:
        """What a request of ``mode`` needs of this engine, as plain values."""
        tokenizer = self.tokenizer

        def decode(tokens: Sequence[int]) -> str:
            return str(tokenizer.decode(list(tokens), skip_special_tokens=True))

        return RunContext(
            decode,
            self.token_text,
            self.eos_ids,
            self.stage_count(mode),
            self.clock_scale(mode),
            self.options.weights,
            self.backend.weight_bytes(mode),
        )

    def check_fits(self, prompt_ids: Sequence[int], config: GenerationConfig) -> None:
        """Refuse a request that cannot fit the context (before any stage is touched)."""
        if not prompt_ids:
            raise ConfigError("the prompt is empty")
        if len(prompt_ids) + config.max_tokens > self.options.max_context:
            raise ConfigError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({config.max_tokens}) exceeds the context of "
                f"{self.options.max_context} tokens",
                hint="lower --max-tokens or raise --max-context",
            )


@dataclass(frozen=True)
class RunContext:
    """What a request's run needs of its engine: its text functions and the numbers it reports."""

    decode: Callable[[Sequence[int]], str]  # tokens -> text (special tokens skipped)
    token_text: Callable[[int], str]  # one token's own text (traced trees)
    eos_ids: frozenset[int]
    stages: int  # stages the request runs on
    clock_scale: float  # real seconds per reported second (emulation)
    weights: str = "auto"  # the weight format (--weights)
    weight_bytes: tuple[int, ...] = ()  # per stage


class RequestRun:
    """One request's side of decoding: the stop rules (EOS, max tokens, stop strings), the text streamed so far
    (never a partial character, never any part of a stop string) and the statistics. Fed with the decoder's
    steps; whoever drives the decoder (``Engine.generate``, a batch) yields what it returns."""

    def __init__(
        self, ctx: RunContext, prompt_ids: Sequence[int], config: GenerationConfig, mode: str, draft: Any
    ) -> None:
        self.ctx, self.config, self.mode, self.draft = ctx, config, mode, draft
        self.prompt_tokens = len(prompt_ids)
        self.started = time.perf_counter()
        self.out: list[int] = []
        self.logprobs: list[TokenLogprob] = []  # one per token of ``out``
        self.sent = ""  # text streamed so far
        self.searched = 0  # characters of the stable text already searched for stop strings
        self.final_text: str | None = None  # set when a stop string ended the output
        self.steps = self.forwards = self.accepted = 0
        self.reason: FinishReason = "length"
        self.done = False
        self._draft0 = (draft.forwards, draft.cost)
        self.utilization = BusyWindow()

    def _decode(self, tokens: Sequence[int]) -> str:
        return self.ctx.decode(tokens)

    def on_step(self, step: DecodeStep) -> Iterator[Event]:
        """Events for one verified wave (a ``DecodeStep``); sets ``done`` when the request is complete."""
        config = self.config
        self.forwards += 1
        self.steps = step.tick
        v = step.verification
        before = len(self.out)
        new = list(v.emitted[: config.max_tokens - before])
        if config.stop_on_eos:
            for i, t in enumerate(new):
                if t in self.ctx.eos_ids:
                    new, self.reason = new[: i + 1], "eos"
                    break
        self.accepted += min(v.accepted_drafts, len(new))
        self.out.extend(new)
        self.logprobs.extend(step.logprobs[: len(new)])
        full = self._decode(self.out)
        stable = full[: len(full) - 1] if full.endswith("\ufffd") else full
        show = len(stable)
        if config.stop:
            at = find_stop(stable, config.stop, self.searched)
            if at is not None:
                self._cut_at_stop(stable, at)
                stable, show, self.reason = stable[:at], at, "stop"
            else:
                show -= held_back(stable, config.stop)
                self.searched = len(stable)
        yield StepCompleted(self.steps, step.wave_size, len(new), v.accepted_drafts, v.flushed)
        if step.stage_busy:
            busy = self.utilization.add(time.perf_counter(), step.stage_busy)
            if busy is not None:
                yield StageUtilization(busy, self.draft_now())
        if config.trace and step.tree is not None:
            yield self.snapshot(step)
        if new:  # the tokens kept: those after a completed stop string are dropped
            lps = tuple(self.logprobs[before:])
            yield TokensCommitted(tuple(self.out[before:]), stable[len(self.sent) : show], self.steps, lps)
            self.sent = stable[:show]
        if self.reason in ("eos", "stop") or len(self.out) >= config.max_tokens:
            self.done = True

    def draft_now(self) -> str:
        """The draft source in use: its name, and ``auto``'s current arm."""
        arm = getattr(self.draft, "arm", "")
        return f"{self.draft.name} → {arm}" if arm else str(self.draft.name)

    def snapshot(self, step: DecodeStep) -> TreeSnapshot:
        text = self.ctx.token_text
        nodes = tuple(TreeNodeView(n.node, n.parent, text(n.token), n.state, n.stage) for n in step.tree or ())
        v = step.verification
        return TreeSnapshot(step.tick, self.ctx.stages, nodes, v.committed, v.dead, v.flushed)

    def _cut_at_stop(self, text: str, at: int) -> None:
        """Keep the tokens up to the one that completes the stop string (they were generated; usage counts them)."""
        self.final_text = text[:at]
        while len(self.out) > 1 and find_stop(self._decode(self.out[:-1]), self.config.stop) == at:
            self.out.pop()
        del self.logprobs[len(self.out) :]

    def finish(self, busy_fraction: tuple[float, ...] = ()) -> Iterator[Event]:
        """The rest of the text (held back for a possible stop string, or a partial character) and the stats."""
        text = self.final_text if self.final_text is not None else self._decode(self.out)
        if len(text) > len(self.sent):
            yield TokensCommitted((), text[len(self.sent) :], self.steps)
            self.sent = text
        yield GenerationFinished(self.reason, text, tuple(self.out), self.stats(busy_fraction), tuple(self.logprobs))

    def stats(self, busy_fraction: tuple[float, ...] = ()) -> GenerationStats:
        n, forwards, steps = len(self.out), self.forwards, self.steps
        scale = self.ctx.clock_scale
        wall = (time.perf_counter() - self.started) / scale
        return GenerationStats(
            mode=self.mode,
            draft=self.draft.name,
            prompt_tokens=self.prompt_tokens,
            tokens=n,
            target_forwards=forwards,
            tokens_per_forward=n / forwards if forwards else 0.0,
            steps=steps,
            tokens_per_step=n / steps if steps else 0.0,
            stages=self.ctx.stages,
            accepted_per_step=self.accepted / forwards if forwards else 0.0,
            draft_forwards=self.draft.forwards - self._draft0[0],
            draft_cost=self.draft.cost - self._draft0[1],
            draft_choices=tuple(self.draft.choices),
            wall_s=wall,
            tokens_per_s=n / wall if wall > 0 else 0.0,
            busy_fraction=busy_fraction,
            time_scale=scale,
            weights=self.ctx.weights,
            weight_bytes=self.ctx.weight_bytes,
        )


class BusyWindow:
    """Per stage, the share of the last ``seconds`` it was busy, from samples of its cumulative busy seconds."""

    def __init__(self, seconds: float = 3.0) -> None:
        self.seconds = seconds
        self.samples: deque[tuple[float, tuple[float, ...]]] = deque()

    def add(self, now: float, busy: Sequence[float]) -> tuple[float, ...] | None:
        """Record a sample; the busy shares since the oldest sample in the window (None until there are two)."""
        if self.samples and len(self.samples[-1][1]) != len(busy):
            self.samples.clear()
        self.samples.append((now, tuple(busy)))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.seconds:
            self.samples.popleft()
        then, old = self.samples[0]
        if now <= then:
            return None
        return tuple(max(0.0, min(1.0, (b - a) / (now - then))) for a, b in zip(old, busy, strict=True))


def model_name(spec: str | None) -> str:
    """A short name for a MODEL argument (the bundled model's id, a repo id, or a folder's or file's name)."""
    from homespec.model.loader import model_id

    return model_id(spec)


def chat_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of a conversation under the model's chat template, ready for the assistant's reply."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _eos_ids(source: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for value in (getattr(source.config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    from homespec.model.loader import FAMILY_TURN_ENDS

    for token in FAMILY_TURN_ENDS.get(str(source.raw.get("model_type")), ()):
        found = tokenizer.convert_tokens_to_ids(token)
        if isinstance(found, int) and found != tokenizer.unk_token_id:
            ids.add(found)
    gen = source.folder / "generation_config.json"
    if gen.is_file():
        import json

        value = json.loads(gen.read_text()).get("eos_token_id")
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)
