"""Training a draft head (``homespec train-draft``) from the target's own greedy outputs (DESIGN §5 ``head``).

1. **Data**: for each training prompt, the target's replies (``max_new`` tokens, chat template on): the greedy one
   and ``samples - 1`` sampled at ``temperature``, decoded a batch at a time in lockstep (``Stage.forward_lockstep``:
   one forward per token for the batch, one attention call per layer), with each position's last-layer feature
   ``f`` and greedy next token recorded as the target computes them (in its run dtype: bf16 where ``--dtype``
   picks it, as the head meets them in a bf16 run). A prompt is prefilled once for all its replies, several
   prompts per forward (``PREFILL_ROWS``); prompts of like length share a batch; the sampled rows are drawn
   together (inverse CDF). Measured on this CPU, 128 replies of 96 tokens in bf16: ~1,000 rows/s (BENCHMARKS.md
   §3), bounded by reading the batch's keys at every token (attention: ~2.5 ms per layer at 128 replies of 250
   slots, within 2x of this machine's memory bandwidth). Written ``SHARD_PROMPTS`` prompts at a time to
   ``DIR/data/NNNNN.safetensors``: an interrupted run resumes at the first missing shard. Every reply to a
   held-out prompt is held out. Prompts: the built-in set, the user's, and (``--self-prompts``) requests the
   target writes itself (``self_prompts``, the Magpie method: the target continues its own empty user header).
2. **Training**: the head sees ``(embed(x_q), f_{q-1})`` for every position q of a sequence (causal attention)
   and learns to predict ``f_q`` (smooth L1) and the target's greedy next token through the frozen norm and LM head
   (cross-entropy), EAGLE's objective; with ``unroll`` > 1 (``train-draft --unroll``; default 1) also EAGLE-3's
   training-time test, in which the head reads its own predicted features as a draft several deep does
   (``_loss``). The decoder layer starts from the target's last layer, ``fc`` from "take the feature". Whole
   sequences are packed into steps of ``pack`` rows (each attending only within itself), AdamW, cosine decay.
   ``DIR/checkpoint.pt`` after every epoch, and every 10 minutes within one, makes a run resumable (a stopped run
   ends as one that was not stopped would); ``DIR/head.safetensors`` is the result. Reported per epoch: training
   loss and, on held-out sequences, how often the head's top-1 next token is the target's at each unrolled depth
   (depth 1: true features; ``top1_by_depth``).
3. **EAGLE-3** (``train-draft --eagle3``, ``TrainConfig.taps``): the data records the residual streams entering
   three of the target's layers (``Stage.record``) in place of f; the head (``eagle.Eagle3Trainable``, started by
   ``new_eagle3``) reads fc over them, attends over [its normed embedding, its normed feature], and learns by
   cross-entropy alone through its own norm and the target's frozen LM head, with the training-time test as above.
   With ``--soft`` (``TrainConfig.soft``) that cross-entropy is against the target's whole next-token distribution,
   as EAGLE-3 trains, not its greedy token alone: ``soft_targets`` recomputes it from the data (the last recorded
   stream through the target's layers from there on; 98.8% of its argmaxes are the recorded greedy tokens, the
   rest near-ties of bf16), so the data format is unchanged.
   Measured on the same 322k rows (BENCHMARKS.md §3): held-out top-1 after one epoch 0.44 / 0.40 / 0.37 at depths
   1-3 with ``--unroll 3``, against 0.35 / 0.24 / 0.20 for the EAGLE-1 style head.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from homespec.errors import ConfigError, ModelError
from homespec.model.eagle import Eagle3Trainable, EagleConfig
from homespec.model.head import DraftHead, HeadConfig
from homespec.model.kv import TreeKVCache
from homespec.model.quant import as_tensor
from homespec.model.stage import Lockstep, Segment, Stage

Head = DraftHead | Eagle3Trainable  # what train-draft trains: HomeSpec's EAGLE-1 style head, or an EAGLE-3 head


@dataclass(frozen=True)
class TrainConfig:
    max_new: int = 96
    epochs: int = 10
    lr: float = 5e-4
    cls_weight: float = 0.2  # EAGLE uses 0.1; a small target's features are noisier, the token matters more
    noise: float = 0.05  # uniform noise on input features (EAGLE), for robustness to its own predictions
    holdout: float = 0.1
    seed: int = 0
    unroll: int = 1  # EAGLE-3's training-time test: steps in which the head reads its own predicted features
    eval_depth: int = 3  # held-out top-1 reported at depths 1 .. max(unroll, eval_depth), whatever the training
    dtype: str = "fp32"  # "bf16": the products in bf16 autocast (the target's stage then runs in bf16 too)
    pack: int = 2048  # rows per training step: sequences packed until they reach it (0: one sequence per step)
    taps: tuple[int, ...] = ()  # an EAGLE-3 head over the streams entering these layers (``new_eagle3``); () EAGLE-1
    # the cross-entropy against the target's whole next-token distribution (``soft_targets``, EAGLE-3's loss) in
    # place of its greedy token alone
    soft: bool = False
    head_layers: int = 1  # an EAGLE-3 head's decoder layers (``new_eagle3``; the published layout has one)


@dataclass
class Sequences:
    tokens: list[torch.Tensor]  # int64 [T]
    features: list[torch.Tensor]  # float16 [T, hidden]
    labels: list[torch.Tensor]  # int64 [T]: the target's greedy next token after each position
    groups: list[int] = field(default_factory=list)  # the prompt each sequence answers (held out together)
    # where each sequence's reply begins (its first token the target wrote; ``mark_replies``): rows before it read
    # the prompt, where a draft never runs, and are left out of the loss and the held-out top-1. Empty: every row.
    starts: list[int] = field(default_factory=list)

    def mark_replies(self, header: Sequence[int]) -> None:
        """Set ``starts`` from the chat template's assistant header (``reply_header``): each reply begins after
        the header's last occurrence in its sequence (0, every row, where it does not occur)."""
        self.starts = [_after_last(t.tolist(), list(header)) for t in self.tokens]

    def first_scored(self, i: int) -> int:
        """Sequence i's first row in the loss and the held-out top-1: row r predicts the token at r + 2, so the
        rows from the reply's start - 2 (every row where unmarked)."""
        return max(0, self.starts[i] - 2) if self.starts else 0

    def scored_rows(self) -> int:
        """Rows in the loss and the held-out top-1 at depth 1 (each sequence's len - 1 rows from ``first_scored``)."""
        return sum(max(0, len(t) - 1 - self.first_scored(i)) for i, t in enumerate(self.tokens))

    def group_of(self, i: int) -> int:
        return self.groups[i] if self.groups else i

    def extend(self, other: Sequences, groups: bool = False) -> None:
        """Append ``other``'s sequences; with ``groups`` its prompts are new ones (numbered after this data's), as
        for data from another run, else its group numbers are kept (the shards of one run)."""
        mine = [self.group_of(i) for i in range(len(self.tokens))]
        base = 1 + max(mine, default=-1) if groups else 0
        self.tokens += other.tokens
        self.features += other.features
        self.labels += other.labels
        self.groups = mine + [base + other.group_of(i) for i in range(len(other.tokens))]
        if self.starts or other.starts:
            pad = [0] * (len(self.tokens) - len(other.tokens) - len(self.starts))
            self.starts = self.starts + pad + (other.starts or [0] * len(other.tokens))

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        for i, (t, f, y) in enumerate(zip(self.tokens, self.features, self.labels, strict=True)):
            tensors[f"{i}.tokens"], tensors[f"{i}.features"], tensors[f"{i}.labels"] = t, f.contiguous(), y
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"count": str(len(self.tokens)), "groups": json.dumps(self.groups)}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load_shards(cls, folder: Path) -> Sequences:
        """Every shard ``build_data`` wrote into ``folder``, in order."""
        out = cls([], [], [])
        for path in sorted(folder.glob("[0-9][0-9][0-9][0-9][0-9].safetensors")):
            out.extend(cls.load(path))
        return out

    @classmethod
    def load(cls, path: Path) -> Sequences:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            n = int(meta["count"])
            get = f.get_tensor
            return cls(
                [get(f"{i}.tokens") for i in range(n)],
                [get(f"{i}.features") for i in range(n)],
                [get(f"{i}.labels") for i in range(n)],
                [int(g) for g in json.loads(meta.get("groups", "[]"))],
            )


SHARD_PROMPTS = 256  # prompts per data shard (``build_data``): what an interrupted run loses at most


def build_data(
    engine: Any,
    prompts: Sequence[str],
    max_new: int,
    progress: Callable[[], None],
    samples: int = 1,
    temperature: float = 0.8,
    batch: int = 16,
    seed: int = 0,
    shards: Path | None = None,
    on_shard: Callable[[int, int, int, float], None] | None = None,
    record: Sequence[int] = (),
) -> Sequences:
    """``samples`` replies of the target to each prompt, the first greedy and the others sampled at
    ``temperature`` (the target's own text, as the head will meet it), with every position's feature and greedy
    next token recorded as they are computed. Replies are decoded ``batch`` at a time in lockstep
    (``_decode_batch``), prompts of similar length together (less padding to read in attention).

    With ``shards`` (a folder), the prompts go ``SHARD_PROMPTS`` at a time, each group's replies written to
    ``shards/NNNNN.safetensors`` as it ends and read back instead of made again by a later run with the same
    settings (``shards/plan.json``; other settings are refused): a run of millions of rows is resumable.
    ``progress`` is called once per prompt whose replies are all done; ``on_shard(index, shards, rows, seconds)``
    after each shard made. With ``record`` (an EAGLE-3 head's feature layers) the features kept are the streams
    entering those layers, concatenated [T, len(record) * hidden] in bf16 (``Stage.record``; their outlier channels
    reach ~25,000 on the bundled model, too near float16's range), instead of the last hidden states."""
    stage: Stage = _whole_target(engine)
    stage.record = tuple(record)
    try:
        return _build(engine, stage, prompts, max_new, progress, samples, temperature, batch, seed, shards, on_shard)
    finally:
        stage.record, stage.last_streams = (), None


def _build(
    engine: Any,
    stage: Stage,
    prompts: Sequence[str],
    max_new: int,
    progress: Callable[[], None],
    samples: int,
    temperature: float,
    batch: int,
    seed: int,
    shards: Path | None,
    on_shard: Callable[[int, int, int, float], None] | None,
) -> Sequences:
    encoded = [engine.encode(p) for p in prompts]  # once per prompt, not once per reply
    order = sorted(range(len(encoded)), key=lambda g: len(encoded[g]))  # similar widths share a batch: less padding
    per = max(1, samples)
    if shards is not None:
        plan = {
            "prompts": hashlib.sha256("\x00".join(prompts).encode()).hexdigest(),
            "count": len(prompts),
            "max_new": max_new,
            "samples": per,
            "temperature": temperature,
            "seed": seed,
            "shard_prompts": SHARD_PROMPTS,
            "dtype": str(stage.dtype).removeprefix("torch."),
        }
        if stage.record:  # (only then: folders made before this key existed stay resumable)
            plan["features"] = list(stage.record)
        _check_plan(shards / "plan.json", plan)
    size = SHARD_PROMPTS if shards is not None else max(1, len(order))
    parts = [order[i : i + size] for i in range(0, len(order), size)]
    out = Sequences([], [], [])
    for index, part in enumerate(parts):
        path = None if shards is None else shards / f"{index:05d}.safetensors"
        if path is not None and path.is_file():
            got = Sequences.load(path)
            for _ in part:
                progress()
        else:
            started = time.perf_counter()
            gen = torch.Generator(device="cpu").manual_seed(seed * 100_003 + index)
            jobs = [(g, k, encoded[g]) for g in part for k in range(per)]
            got = _replies(stage, jobs, max_new, temperature, gen, engine.eos_ids, batch, progress)
            if path is not None:
                tmp = path.with_suffix(".tmp")
                got.save(tmp)
                tmp.replace(path)
            if on_shard is not None:
                on_shard(index, len(parts), sum(len(t) for t in got.tokens), time.perf_counter() - started)
        out.extend(got)
    return out


def _check_plan(path: Path, plan: dict[str, Any]) -> None:
    """Shards made before must have been made with ``plan``; a new folder gets it written."""
    if path.is_file():
        before = json.loads(path.read_text())
        if before != plan:
            changed = sorted(k for k in plan if before.get(k) != plan[k])
            raise ConfigError(
                f"{path.parent} holds training data made with other settings ({', '.join(changed)})",
                hint="use another --out folder, or delete that one to start over",
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan, indent=2))


def _replies(
    stage: Stage,
    jobs: Sequence[tuple[int, int, list[int]]],
    max_new: int,
    temperature: float,
    gen: torch.Generator,
    eos: frozenset[int],
    batch: int,
    progress: Callable[[], None],
) -> Sequences:
    out = Sequences([], [], [])
    left: dict[int, int] = {}
    for g, _, _ in jobs:
        left[g] = left.get(g, 0) + 1
    for first in range(0, len(jobs), batch):
        for g, seq, feats, labels, _ in _decode_batch(
            stage, jobs[first : first + batch], max_new, temperature, gen, eos
        ):
            out.tokens.append(seq)
            out.features.append(feats)
            out.labels.append(labels)
            out.groups.append(g)
            left[g] -= 1
            if left[g] == 0:
                progress()
    return out


def _decode_batch(
    stage: Stage,
    jobs: Sequence[tuple[int, int, list[int]]],  # (prompt index, sample index: 0 is greedy, prompt ids)
    max_new: int,
    temperature: float,
    gen: torch.Generator,
    eos: frozenset[int],
) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, bool]]:
    """Decode one batch of replies in lockstep (``Stage.forward_lockstep``: one forward per token for the batch,
    attention of all of them in one call per layer); per job (prompt index, tokens, float16 features, greedy next
    tokens, whether the reply ended with an end token: that token, drawn last, has no feature and is not kept).
    A prompt is prefilled once for all its replies in the batch, several prompts per forward (``_prefill_groups``),
    its keys copied right-aligned into each reply's row of the batch's cache; a batch whose replies have mostly
    ended is compacted to the live ones."""
    n_jobs, lengths = len(jobs), [len(ids) for _, _, ids in jobs]
    width = max(lengths)
    shape = (len(stage.layers), n_jobs, stage.kv_heads, width + max_new, stage.head_dim)
    k = torch.zeros(shape, dtype=stage.dtype, device=stage.device)
    v = torch.zeros(shape, dtype=stage.dtype, device=stage.device)
    tokens: list[list[int]] = [[] for _ in jobs]
    feats: list[list[torch.Tensor]] = [[] for _ in jobs]
    labels: list[list[torch.Tensor]] = [[] for _ in jobs]
    last: list[torch.Tensor] = [torch.empty(0) for _ in jobs]  # each job's last logits
    shared: dict[int, list[int]] = {}  # a prompt's jobs (its replies): prefilled once for all of them
    for j, (g, _, _) in enumerate(jobs):
        shared.setdefault(g, []).append(j)
    firsts = [js[0] for js in shared.values()]
    for group in _prefill_groups([lengths[j] for j in firsts]):  # several prompts per forward: wider products
        heads = [firsts[i] for i in group]
        caches = [stage.new_cache(lengths[j] + 1, 1) for j in heads]
        segments = [Segment(c, *_prefix_rows(c, lengths[j])) for c, j in zip(caches, heads, strict=True)]
        ids = [t for j in heads for t in jobs[j][2]]
        logits = stage.forward_batch(segments, torch.tensor(ids), [p for j in heads for p in range(lengths[j])])
        hidden, best = _features(stage), torch.argmax(logits.float(), dim=-1)
        a = 0
        for first, cache in zip(heads, caches, strict=True):
            n = lengths[first]
            for j in shared[jobs[first][0]]:
                k[:, j, :, width - n : width] = cache.k[:, :, :n]
                v[:, j, :, width - n : width] = cache.v[:, :, :n]
                tokens[j] = list(jobs[j][2])
                feats[j] = [hidden[a : a + n]]
                labels[j] = [best[a : a + n]]
                last[j] = logits[a + n - 1]
            a += n
    rows = list(range(n_jobs))  # the job each row of k/v holds
    greedy = torch.tensor([jobs[j][1] == 0 or temperature <= 0 for j in rows])
    pad = torch.tensor([width - n for n in lengths], device=stage.device)
    live = set(rows)
    current = torch.stack(last)  # [rows, vocab]: each row's last logits
    for step in range(max_new):
        drawing = [r for r, j in enumerate(rows) if j in live]
        picks = draw(current[drawing], greedy[[rows[r] for r in drawing]], temperature, gen).tolist()
        for r, pick in zip(drawing, picks, strict=True):
            tokens[rows[r]].append(pick)
            if pick in eos:
                live.discard(rows[r])
        if not live:
            break
        if 2 * len(live) <= len(rows):  # most have ended: keep only the live rows
            keep = [r for r, j in enumerate(rows) if j in live]
            index = torch.tensor(keep, device=stage.device)
            k, v, pad = k.index_select(1, index), v.index_select(1, index), pad[index]
            rows = [rows[r] for r in keep]
        x = torch.tensor([tokens[j][-1] for j in rows])
        current = stage.forward_lockstep(Lockstep(k, v, pad, width + step), x)
        hidden = _features(stage)
        best = torch.argmax(current.float(), dim=-1)  # once for the batch (over bf16 logits: ~5x slower here)
        for r, j in enumerate(rows):
            if j in live:
                feats[j].append(hidden[r : r + 1])
                labels[j].append(best[r : r + 1])
    results = []
    for j, (g, _, _) in enumerate(jobs):
        n = sum(len(f) for f in feats[j])  # positions computed: the last token drawn has no feature yet
        seq = torch.tensor(tokens[j][:n], dtype=torch.int64)
        results.append((g, seq, torch.cat(feats[j]), torch.cat(labels[j]), j not in live))
    return results


def _features(stage: Stage) -> torch.Tensor:
    """What the last call's rows record as their features: the streams ``stage.record`` names (bf16), else the last
    hidden states (float16)."""
    if stage.record:
        assert stage.last_streams is not None
        return stage.last_streams.to(torch.bfloat16)
    assert stage.last_hidden is not None
    return stage.last_hidden.to(torch.float16)


def draw(logits: torch.Tensor, greedy: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    """One next token per row of ``logits`` [R, vocab]: the argmax where ``greedy`` [R] is set, else a draw from
    softmax(logits / ``temperature``) by inverse CDF, one uniform per row from ``gen`` (the sampled rows together:
    ``torch.multinomial`` costs ~0.9 ms per row of this vocabulary here, the batch's cumulative sums ~3 ms for 128)."""
    wide = logits.float()
    picks = torch.argmax(wide, dim=-1)
    sampled = torch.nonzero(~greedy).flatten()
    if sampled.numel():
        cdf = torch.softmax(wide[sampled] / temperature, dim=-1).cumsum(dim=-1)
        u = torch.rand(len(sampled), 1, generator=gen, dtype=cdf.dtype) * cdf[:, -1:]
        picks[sampled] = torch.searchsorted(cdf, u, right=True).flatten().clamp_(max=wide.shape[-1] - 1)
    return picks


USER_MARK = "\x00HOMESPEC-USER\x00"  # stands for a user's message while the chat template is rendered


def user_header(tokenizer: Any) -> list[int]:
    """The chat template's text up to where a user's first message begins (its system turn, if it writes one, and
    the user header), as token ids: what the target continues with a user's request (``self_prompts``)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError("self-written prompts need the target's chat template, and this tokenizer has none")
    text = tokenizer.apply_chat_template([{"role": "user", "content": USER_MARK}], tokenize=False)
    if USER_MARK not in text:
        raise ModelError("the chat template does not place the user's message where it can be found")
    return list(tokenizer(text[: text.index(USER_MARK)], add_special_tokens=False)["input_ids"])


def self_prompts(
    engine: Any,
    count: int,
    *,
    temperature: float = 1.0,
    max_len: int = 96,
    batch: int = 32,
    seed: int = 0,
    exclude: Sequence[str] = (),
    progress: Callable[[int], None] | None = None,
    journal: Path | None = None,
) -> list[str]:
    """Up to ``count`` user requests written by the target itself (Magpie: Xu et al., 2024, "Magpie: Alignment
    Data Synthesis from Scratch by Prompting Aligned LLMs with Nothing"): its continuation of the empty user header
    (``user_header``), sampled at ``temperature`` and decoded ``batch`` at a time in lockstep, is a request from the
    distribution the target was tuned on. Kept: a continuation that ended with an end token within ``max_len``
    tokens, of 16 to 2000 characters and at least 3 words, not seen before and not in ``exclude`` (the bench
    prompts), case and spacing folded. Draws stop at ``count`` kept or after ``4 * count`` draws. Batch ``i`` draws
    from its own generator seeded by (``seed``, ``i``), so the same seed gives the same list, and a run stopped
    midway and resumed from its ``journal`` (JSONL: the settings, then each batch's kept requests, appended as the
    batch ends; ``_journal_read``) gives the same list as one run. ``progress`` hears the count kept after each
    batch."""
    stage: Stage = _whole_target(engine)
    header = user_header(engine.tokenizer)
    settings = {"seed": seed, "temperature": temperature, "max_len": max_len, "batch": batch}
    done = _journal_read(journal, settings) if journal is not None else []
    seen = {_fold(t) for t in exclude}
    kept: list[str] = []
    for text in itertools.chain.from_iterable(done):  # as the batches before kept them (filtered again: exclude
        if _fold(text) not in seen:  # may have grown since)
            seen.add(_fold(text))
            kept.append(text)
    if progress is not None and done:
        progress(min(len(kept), count))
    for i in range(len(done), -(-4 * count // batch)):
        if len(kept) >= count:
            break
        gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + i)
        jobs = [(0, 1, header) for _ in range(batch)]
        fresh: list[str] = []
        for _, seq, _, _, ended in _decode_batch(stage, jobs, max_len, temperature, gen, engine.eos_ids):
            text = str(engine.tokenizer.decode(seq[len(header) :].tolist(), skip_special_tokens=True)).strip()
            key = _fold(text)
            if ended and 16 <= len(text) <= 2000 and len(text.split()) >= 3 and key not in seen:
                seen.add(key)
                fresh.append(text)
        kept += fresh
        if journal is not None:
            with journal.open("a") as f:
                f.write(json.dumps({"batch": i, "kept": fresh}) + "\n")
        if progress is not None:
            progress(min(len(kept), count))
    return kept[:count]


def _fold(text: str) -> str:
    """A request as compared for duplicates: lower case, runs of spacing as one space."""
    return " ".join(text.lower().split())


def _journal_read(path: Path, settings: dict[str, Any]) -> list[list[str]]:
    """The requests each batch kept, in order, from a ``self_prompts`` journal (started, with ``settings`` as its
    first line, where there is none). A last line cut off by a stop is dropped (that batch runs again); a journal of
    other settings is refused, since its batches would not be the ones these settings draw."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"settings": settings}) + "\n")
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    try:
        head = json.loads(lines[0])["settings"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a self-written prompts journal", hint="remove it to start again") from e
    if head != settings:
        raise ConfigError(
            f"{path} was written with {head}, not {settings}", hint="use the same settings, or remove it to start again"
        )
    done: list[list[str]] = []
    whole = len(lines[0]) + 1  # bytes of the journal up to its last whole line
    for line in lines[1:-1]:  # (the last is empty, or a line cut off before its newline)
        try:
            row = json.loads(line)
            texts = row["kept"]
            ok = row["batch"] == len(done) and isinstance(texts, list) and all(isinstance(t, str) for t in texts)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            break
        done.append(texts)
        whole += len(line) + 1
    if whole < len(data):  # a cut-off tail: cut it, so that the next batch's line follows a whole one
        with path.open("r+b") as f:
            f.truncate(whole)
    return done


def reply_header(tokenizer: Any) -> list[int]:
    """The token ids the chat template writes between a user's message and the assistant's reply (its end of the
    user turn and the assistant header, as ``add_generation_prompt`` adds it): what ``Sequences.mark_replies``
    finds in each sequence."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError("marking replies needs the target's chat template, and this tokenizer has none")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": USER_MARK}], tokenize=False, add_generation_prompt=True
    )
    return list(tokenizer(text[text.index(USER_MARK) + len(USER_MARK) :], add_special_tokens=False)["input_ids"])


def _after_last(tokens: list[int], header: list[int]) -> int:
    n = len(header)
    for end in range(len(tokens) - n, -1, -1):
        if tokens[end : end + n] == header:
            return end + n
    return 0


PREFILL_ROWS = 1024  # prompt tokens prefilled in one forward (bf16 products on this CPU: ~2x faster than 100 rows)


def _prefill_groups(lengths: Sequence[int]) -> list[list[int]]:
    """Jobs in order, grouped so that each group's prompts add up to at most PREFILL_ROWS tokens (or one prompt)."""
    groups: list[list[int]] = []
    rows = 0
    for j, n in enumerate(lengths):
        if not groups or rows + n > PREFILL_ROWS:
            groups.append([])
            rows = 0
        groups[-1].append(j)
        rows += n
    return groups


def _prefix_rows(cache: TreeKVCache, n: int) -> tuple[int, int, torch.Tensor]:
    start, mask = cache.reserve_prefix(n)
    return start, n, mask


def new_head(engine: Any) -> DraftHead:
    """A head for the engine's target: its decoder layer copied from the target's last layer."""
    stage = _whole_target(engine)
    head = DraftHead(HeadConfig.for_target(engine.source.config))
    last, got = _last_layer(stage)
    with torch.no_grad():
        for name in ("q", "k", "v", "o", "gate", "up", "down"):
            getattr(head, name).weight.copy_(got["w" + name[0]])
        head.ln1.copy_(last.ln1)
        head.ln2.copy_(last.ln2)
        h = head.cfg.hidden
        head.fc.weight.zero_()
        head.fc.weight[:, h:] = torch.eye(h)  # start as "the feature itself"
        head.fc.weight[:, :h].normal_(0.0, 0.02)
    return head


def _last_layer(stage: Stage) -> tuple[Any, dict[str, torch.Tensor]]:
    """The target's last layer and its projections as fp32 tensors (``wq`` .. ``wd``): what a new head starts from."""
    last = stage.layers[-1]
    got = {k: last.part(k, stage.part_rows) for k in ("wq", "wk", "wv", "wo", "wg", "wu", "wd")}
    if any(w is None for w in got.values()):
        raise ModelError("train-draft copies the target's last MLP: a mixture-of-experts last layer has none")
    return last, {k: as_tensor(w).float() for k, w in got.items() if w is not None}


def new_eagle3(engine: Any, taps: Sequence[int], layers: int = 1) -> Eagle3Trainable:
    """An EAGLE-3 head for the engine's target over the streams entering layers ``taps``, started as the head
    before (``new_head``): its layer from the target's last layer (q/k/v's feature half; the embedding half small and
    random), both input norms the target's last input norm, ``norm`` the target's final norm, and fc taking the last
    of the streams as it is. It drafts through the target's LM head. Each further layer (``layers`` > 1, a HomeSpec
    extension) is the target's last layer with its two output projections zero, so that it adds nothing to the
    stream until trained: a head grown from a trained one (``--init``) starts as that head."""
    stage = _whole_target(engine)
    last, got = _last_layer(stage)
    h = stage.hidden
    inter, kvh = stage.part_rows["wg"], stage.kv_heads
    cfg = EagleConfig(3, h, stage.heads, kvh, stage.head_dim, inter, stage.eps, 0, tuple(taps), layers=layers)
    head = Eagle3Trainable(cfg)
    w = head.w
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, key in (("q", "wq"), ("k", "wk"), ("v", "wv")):
            dst = w[f"layer.self_attn.{name}_proj.weight"]
            dst[:, :h] = torch.randn(dst.shape[0], h, generator=gen) * 0.02
            dst[:, h:] = got[key]
        rest = (("self_attn.o_proj", "wo"), ("mlp.gate_proj", "wg"), ("mlp.up_proj", "wu"), ("mlp.down_proj", "wd"))
        for name, key in rest:
            w[f"layer.{name}.weight"].copy_(got[key])
        w["layer.input_layernorm.weight"].copy_(last.ln1)
        w["layer.hidden_norm.weight"].copy_(last.ln1)
        w["layer.post_attention_layernorm.weight"].copy_(last.ln2)
        w["norm.weight"].copy_(stage.norm_w if stage.norm_w is not None else torch.ones(h))
        w["fc.weight"][:, (len(taps) - 1) * h :] = torch.eye(h)
        for i in range(1, layers):
            pre = f"layers.{i}."
            for name, key in (
                ("self_attn.q_proj", "wq"),
                ("self_attn.k_proj", "wk"),
                ("self_attn.v_proj", "wv"),
                *rest,
            ):
                w[f"{pre}{name}.weight"].copy_(got[key])
            w[f"{pre}self_attn.o_proj.weight"].zero_()
            w[f"{pre}mlp.down_proj.weight"].zero_()
            w[f"{pre}input_layernorm.weight"].copy_(last.ln1)
            w[f"{pre}post_attention_layernorm.weight"].copy_(last.ln2)
    return head


def train(
    engine: Any,
    data: Sequences,
    out_dir: Path,
    cfg: TrainConfig,
    report: Callable[[dict[str, float]], None],
    progress: Callable[[], None] | None = None,
    max_steps: int | None = None,
    init: Head | None = None,
    vocab: torch.Tensor | None = None,
    checkpoint_s: float = 600.0,
) -> Head:
    """Train (or resume) a head on ``data``, from ``init`` (a head to go on training; its weights are changed in
    place) or a new one (``new_head``); writes DIR/checkpoint.pt at the end of each epoch and, within one, every
    ``checkpoint_s`` seconds (a run of millions of rows stopped midway resumes after its last saved pack, and ends
    as the run that was not stopped would), and DIR/head.safetensors. ``vocab``
    (sorted token ids; EAGLE-3 only): the draft vocabulary the head will score, its loss and top-1 over those
    tokens only (``DraftVocab``)."""
    stage = _whole_target(engine)
    dv = DraftVocab.of(stage, vocab) if vocab is not None and cfg.taps else None
    torch.manual_seed(cfg.seed)
    train_ids, held = split(data, cfg)
    if cfg.taps:
        width = len(cfg.taps) * stage.hidden
        if any(f.shape[-1] != width for f in data.features):
            raise ConfigError(
                f"an EAGLE-3 head reads {len(cfg.taps)} streams ({width} values a row); this data holds other features",
                hint="make the data with train-draft --eagle3 (it records the streams as it decodes)",
            )
    head = init if init is not None else new_eagle3(engine, cfg.taps, cfg.head_layers) if cfg.taps else new_head(engine)
    opt = torch.optim.AdamW([p for p in head.parameters()], lr=cfg.lr, weight_decay=0.0)
    lengths = [len(t) - 1 for t in data.tokens]
    per_epoch = len(packs(train_ids, lengths, cfg.pack, random.Random(0)))
    total = cfg.epochs * per_epoch if max_steps is None else max_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    ckpt = out_dir / "checkpoint.pt"
    first_epoch = skip = steps = 0
    losses: list[float] = []
    spent = 0.0  # seconds of this epoch before a resume
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        first_epoch = int(state["epoch"]) + 1
        if "rng" in state:
            torch.set_rng_state(state["rng"])
        if "within" in state:  # saved within an epoch: go on after its last pack
            first_epoch, skip, steps = (int(state["within"][k]) for k in ("epoch", "packs", "steps"))
            losses, spent = list(state["within"]["losses"]), float(state["within"]["s"])
    saved = time.monotonic()

    def save(epoch: int, within: dict[str, Any] | None = None) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {"head": head.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "epoch": epoch}
        state["rng"] = torch.get_rng_state()
        if within is not None:
            state["within"] = within
        torch.save(state, ckpt.with_suffix(".tmp"))  # (a stop while writing leaves the last checkpoint whole)
        ckpt.with_suffix(".tmp").replace(ckpt)

    for epoch in range(first_epoch, cfg.epochs):
        head.train()
        started = time.perf_counter() - spent
        order = packs(train_ids, lengths, cfg.pack, random.Random(cfg.seed * 1000 + epoch))
        for k, pack in enumerate(order[skip:], start=skip):
            with torch.enable_grad(), _autocast(cfg, stage):  # the engine turns autograd off process-wide
                loss, _ = _loss(head, stage, data, pack, cfg, dv=dv)
                opt.zero_grad()
                loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss))
            steps += 1
            if progress:
                for _ in pack:
                    progress()
            if max_steps is not None and steps >= max_steps:
                break
            if time.monotonic() - saved >= checkpoint_s and k + 1 < len(order):
                s_now = time.perf_counter() - started
                save(epoch - 1, {"epoch": epoch, "packs": k + 1, "steps": steps, "losses": losses, "s": s_now})
                saved = time.monotonic()
        depth = top1_by_depth(head, stage, data, held, cfg, max(cfg.unroll, cfg.eval_depth), dv)
        metrics = {"epoch": epoch, "loss": sum(losses) / max(1, len(losses)), "top1": depth[0]}
        metrics.update({f"top1_d{d + 1}": acc for d, acc in enumerate(depth)})
        report({**metrics, "s": time.perf_counter() - started})
        save(epoch)
        saved, skip, losses, spent = time.monotonic(), 0, [], 0.0
        if max_steps is not None and steps >= max_steps:
            break
    return head


def split(data: Sequences, cfg: TrainConfig) -> tuple[list[int], list[int]]:
    """The sequences trained on and those held out (``cfg.holdout`` of the prompts, drawn with ``cfg.seed``; every
    reply to a held-out prompt is held out)."""
    groups = sorted({data.group_of(i) for i in range(len(data.tokens))})
    random.Random(cfg.seed).shuffle(groups)
    n_hold = max(1, int(len(groups) * cfg.holdout)) if len(groups) > 1 else 0
    held_groups = set(groups[:n_hold])
    held = [i for i in range(len(data.tokens)) if data.group_of(i) in held_groups]
    return [i for i in range(len(data.tokens)) if data.group_of(i) not in held_groups] or held, held


def top1_by_depth(
    head: Head,
    stage: Stage,
    data: Sequences,
    ids: Sequence[int],
    cfg: TrainConfig,
    depth: int,
    dv: DraftVocab | None = None,
) -> list[float]:
    """How often the head's top-1 next token is the target's on sequences ``ids``, at each unrolled depth 1 ..
    ``depth`` (depth 1: the target's own features; depth j: the head's own predicted features j - 1 deep)."""
    head.eval()
    deep = dataclasses.replace(cfg, unroll=depth, soft=False)  # (the hits only: no targets for a loss)
    lengths = [len(t) - 1 for t in data.tokens]
    with torch.no_grad(), _autocast(cfg, stage):
        hits = [_loss(head, stage, data, pack, deep, False, dv)[1] for pack in packs(ids, lengths, cfg.pack)]
    return [
        sum(h[d][0] for h in hits if len(h) > d) / max(1, sum(h[d][1] for h in hits if len(h) > d))
        for d in range(depth)
    ]


def packs(ids: Sequence[int], lengths: Sequence[int], rows: int, rng: random.Random | None = None) -> list[list[int]]:
    """``ids`` (shuffled by ``rng`` when given) in consecutive groups of at least ``rows`` rows each (the last may
    have fewer; ``rows`` <= 0: one sequence per group): the sequences one training step packs together."""
    order = list(ids)
    if rng is not None:
        rng.shuffle(order)
    out: list[list[int]] = []
    filled = 0
    for i in order:
        if not out or filled >= rows:
            out.append([])
            filled = 0
        out[-1].append(i)
        filled += lengths[i]
    return out


def _autocast(cfg: TrainConfig, stage: Stage) -> Any:
    """bf16 products for ``cfg.dtype`` bf16 (AMX and AVX-512 BF16 on CPUs that have them: ~8x fp32 here), the
    parameters, optimizer and losses staying fp32; a no-op context for fp32."""
    device = torch.device(stage.device).type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")


@dataclass(frozen=True)
class DraftVocab:
    """An EAGLE-3 head's draft vocabulary in training: the target's LM-head rows for those tokens, and each token's
    draft id (-100 for the rest). The cross-entropy runs over the K rows (the full LM head is ~87% of a training
    step's products on the bundled model: 49,152 rows against the head's ~4M weights a row); a row whose next token
    is outside the vocabulary is not in the loss and counts as a miss in top-1, as at inference."""

    ids: torch.Tensor  # [K] sorted token ids
    rows: torch.Tensor  # [K, hidden]: the target's LM-head rows
    index: torch.Tensor  # [vocab]: draft id of each token, -100 where none

    @staticmethod
    def of(stage: Stage, ids: torch.Tensor) -> DraftVocab:
        assert stage.head_w is not None
        ids = ids.to(torch.int64)
        full = as_tensor(stage.head_w)
        index = torch.full((full.shape[0],), -100, dtype=torch.int64)
        index[ids] = torch.arange(len(ids))
        return DraftVocab(ids, full[ids].contiguous(), index)


def _loss(
    head: Head,
    stage: Stage,
    data: Sequences,
    ids: Sequence[int],
    cfg: TrainConfig,
    noise: bool = True,
    dv: DraftVocab | None = None,
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Loss on the sequences ``ids`` packed into one set of rows (each attending only within itself: ``ttt_mask``),
    and (top-1 hits, rows) at each unrolled depth (``cfg.unroll`` steps).

    Step 0 is EAGLE's: row r reads the token t_{r+1} and the target's feature f_r and predicts f_{r+1} and the
    target's next token. Step j reads, at row r, the feature step j - 1 predicted at row r - 1, as a draft j deep
    does at inference, and attends as such a draft would: to the true rows up to r - j, then to its own chain of
    predictions (EAGLE-3's training-time test, Li et al., 2025); rows r < j have no such chain and are not scored.
    The tokens stay the target's own (teacher forcing); gradients flow through the predicted features. Each
    step's loss (feature regression + ``cls_weight`` × cross-entropy, averaged over its scored rows) counts
    equally. An EAGLE-3 head (``Eagle3Trainable``) reads fc over the recorded streams where the EAGLE-1 head reads
    f_r, and its loss is the cross-entropy alone, through its own norm and the target's LM head (EAGLE-3: its
    features are its own, with no target to regress to)."""
    spans = [len(data.tokens[i]) - 1 for i in ids]  # rows r = 0 .. T-1 of each sequence
    tokens = torch.cat([data.tokens[i][1:] for i in ids])
    feats = [data.features[i].float() for i in ids]
    emb = stage.embed(tokens).detach()
    eagle3 = isinstance(head, Eagle3Trainable)
    inp = torch.cat([f[:-1] for f in feats])
    first = torch.stack([f[0] for f in feats])
    if eagle3:
        inp, first = head.fc(inp), head.fc(first)
    if noise and cfg.noise:
        inp = inp + (torch.rand_like(inp) - 0.5) * 2 * cfg.noise
    local = torch.cat([torch.arange(n) for n in spans])  # each row's position in its sequence
    cos, sin = stage.rope(local.tolist())
    target = None if eagle3 else torch.cat([f[1:] for f in feats])
    y = torch.cat([data.labels[i][1:] for i in ids])
    soft = soft_targets(stage, data, ids, cfg.taps, dv) if cfg.soft else None
    total = torch.zeros(())
    stats: list[tuple[int, int]] = []
    floor = torch.cat([torch.full((n,), data.first_scored(i)) for i, n in zip(ids, spans, strict=True)])
    for j, pred in enumerate(unrolled(head, emb, inp, first, cos, sin, cfg.unroll, spans)):
        rows = torch.nonzero((local >= j) & (local >= floor)).flatten()
        p = None if soft is None else soft[rows].float()  # the target's distribution at these rows (``--soft``)
        if isinstance(head, Eagle3Trainable) and dv is not None:  # over the draft vocabulary's tokens only
            logits = stage.logits(head.normed(pred[rows]), head_w=dv.rows, normed=True).float()
            want = dv.index[y[rows]]
            if p is not None:
                loss = F.cross_entropy(logits, p)
            else:
                loss = F.cross_entropy(logits, want) if bool((want >= 0).any()) else logits.sum() * 0
            stats.append((int((dv.ids[logits.argmax(-1)] == y[rows]).sum()), len(rows)))
            total = total + loss
            continue
        if isinstance(head, Eagle3Trainable):
            logits = stage.logits(head.normed(pred[rows]), normed=True).float()
            loss = F.cross_entropy(logits, y[rows] if p is None else p)
        else:
            assert target is not None
            logits = stage.logits(pred[rows]).float()  # (argmax over bf16 logits costs ~4x fp32's here)
            loss = F.smooth_l1_loss(pred[rows].float(), target[rows]) + cfg.cls_weight * F.cross_entropy(
                logits, y[rows] if p is None else p
            )
        total = total + loss
        stats.append((int((logits.argmax(-1) == y[rows]).sum()), len(rows)))
    return total / len(stats), stats


def soft_targets(
    stage: Stage, data: Sequences, ids: Sequence[int], taps: Sequence[int], dv: DraftVocab | None = None
) -> torch.Tensor:
    """The target's next-token distribution [rows, vocab] (bf16) at every row of the sequences ``ids`` as ``_loss``
    packs them: row r of a sequence predicts the token after position r + 1, so the target's softmax there. An
    EAGLE-1 head's data holds the last hidden states: through the final norm and LM head. An EAGLE-3 head's holds
    the streams entering the layers ``taps``: the last one (the highest tap) goes on through the target's layers
    from there (``Stage.forward_from``, causal within each sequence, as its prefill would). With a draft vocabulary
    (``dv``), over its tokens, renormalized (EAGLE-3's loss over its draft vocabulary)."""
    with torch.no_grad():
        if taps:
            segments: list[Segment] = []
            positions: list[int] = []
            for i in ids:
                n = len(data.tokens[i])
                cache = stage.new_cache(n + 1, 1)
                segments.append(Segment(cache, *_prefix_rows(cache, n)))
                positions += range(n)
            streams = torch.cat([data.features[i][:, -stage.hidden :].to(stage.dtype) for i in ids])
            out = stage.forward_from(max(taps), segments, streams, positions)
            last = torch.cat([part[1:] for part in out.split([len(data.tokens[i]) for i in ids])])
        else:
            last = torch.cat([data.features[i][1:].to(stage.dtype) for i in ids])  # (cat under autocast: no fp16)
        logits = stage.logits(last, None if dv is None else dv.rows)
        return torch.softmax(logits.float(), dim=-1).to(torch.bfloat16)


def unrolled(
    head: Head,
    emb: torch.Tensor,  # [n, hidden]: row r's token t_{r+1}
    feat: torch.Tensor,  # [n, hidden]: row r's true feature f_r
    first: torch.Tensor,  # [hidden] or [sequences, hidden]: f_0 of each sequence, what its row 0 reads at every step
    cos: torch.Tensor,
    sin: torch.Tensor,
    steps: int,
    spans: Sequence[int] | None = None,  # rows of each packed sequence, in order (None: one sequence of n rows)
) -> list[torch.Tensor]:
    """The head's predicted features [n, hidden] at each unrolled step (``_loss``, ``ttt_mask``): step j > 0 reads
    at row r what step j - 1 predicted at row r - 1 of the same sequence, with the keys of every earlier step in
    its past. Packed sequences give what each would alone."""
    n = emb.shape[0]
    spans = [n] if spans is None else list(spans)
    starts = torch.tensor([0, *itertools.accumulate(spans)][:-1])
    first = first.reshape(len(spans), -1)
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    preds: list[torch.Tensor] = []
    inp = feat
    for j in range(min(max(1, steps), max(spans))):
        past = None if not keys else (torch.cat(keys, 1), torch.cat(values, 1))
        pred, k, v = head(emb, inp, cos, sin, ttt_mask(n, j, spans), past)
        keys.append(k)
        values.append(v)
        preds.append(pred)
        inp = torch.cat([pred[-1:], pred[:-1]]).index_copy(0, starts, first.to(pred.dtype))
    return preds


def ttt_mask(n: int, step: int, spans: Sequence[int] | None = None) -> torch.Tensor:
    """Which keys row r (0..n-1) of unrolled ``step`` attends, over the keys of steps 0..step, n per step: step 0's
    rows 0..r - step (true features), then row r - step + s of each step s in 1..step (its own chain; s = step is
    itself), all within r's own sequence (``spans``: the packed sequences' rows; positions counted in each). Step 0
    is the causal mask. Rows r < step of a sequence have no chain: they attend only to themselves (unscored)."""
    spans = [n] if spans is None else list(spans)
    local = torch.cat([torch.arange(m) for m in spans])
    seq = torch.repeat_interleave(torch.arange(len(spans)), torch.tensor(spans))
    r, c = local[:, None], local[None, :]
    same = seq[:, None] == seq[None, :]
    blocks = [same & (c <= r - step)]
    for s in range(1, step + 1):
        blocks.append(same & (c == r - step + s))
    mask = torch.cat(blocks, dim=1)
    if step:
        early = torch.nonzero(local < step).flatten()
        mask[early] = False
        mask[early, step * n + early] = True
    return mask


DRAFT_VOCAB = 16384  # tokens in a trained head's draft vocabulary (BENCHMARKS.md §3)


def draft_vocabulary(tokens: Sequence[torch.Tensor], vocab_size: int, k: int = DRAFT_VOCAB) -> torch.Tensor:
    """The ``k`` tokens the target wrote most in ``tokens`` (prompts and replies), sorted by id; ties and tokens never
    seen are taken in id order (a BPE vocabulary's order is its merge order, most frequent first)."""
    if not 0 < k <= vocab_size:
        raise ValueError(f"a draft vocabulary needs 0 < k <= {vocab_size}, got {k}")
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for t in tokens:
        counts += torch.bincount(t.to(torch.int64), minlength=vocab_size)[:vocab_size].to(torch.float64)
    ids = torch.arange(vocab_size, dtype=torch.float64)
    order = torch.argsort(counts * vocab_size - ids, descending=True)  # count first, then lower id
    return torch.sort(order[:k]).values


def _whole_target(engine: Any) -> Stage:
    stages = engine.target_stages()
    if len(stages) != 1:
        raise ValueError("train-draft needs the whole target in one in-process stage")
    stage: Stage = stages[0]
    return stage


def load_prompts(path: Path) -> list[str]:
    return [json.loads(line)["turns"][0] for line in path.read_text().splitlines() if line.strip()]
