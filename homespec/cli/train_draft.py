"""``homespec train-draft [MODEL] --out DIR``: train an EAGLE-style draft head from the target's own outputs."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from homespec.cli.common import DEFAULT_DRAFT, keep_freed_memory, quiet_libraries, user_errors
from homespec.errors import ConfigError

BUILTIN_PROMPTS = Path(__file__).resolve().parents[1] / "assets" / "train_prompts.jsonl"


def train_draft(
    model: Annotated[str | None, typer.Argument(help="folder, .gguf or repo id (default: bundled)")] = None,
    out: Annotated[Path, typer.Option("--out", help="folder for data, checkpoint and head.safetensors")] = Path(
        "draft-head"
    ),
    prompts: Annotated[
        Path | None, typer.Option(help="extra JSONL prompts with 'turns' (added to the built-in set)")
    ] = None,
    builtin: Annotated[bool, typer.Option("--builtin/--no-builtin", help="use the built-in prompt set")] = True,
    self_written: Annotated[
        int,
        typer.Option(
            "--self-prompts",
            help="add N user requests the target writes itself (Magpie; kept in DIR/self_prompts.jsonl, never the "
            "bench prompts)",
        ),
    ] = 0,
    limit: Annotated[int, typer.Option(help="use at most N prompts (0 = all)")] = 0,
    max_new: Annotated[int, typer.Option("--max-new", help="reply tokens generated per prompt")] = 96,
    samples: Annotated[
        int, typer.Option(help="replies per prompt: the greedy one, then sampled ones at --temperature")
    ] = 4,
    temperature: Annotated[float, typer.Option(help="temperature of the sampled replies")] = 0.8,
    seed: Annotated[
        int,
        typer.Option(help="seed of the self-written prompts and the sampled replies (another seed: other data)"),
    ] = 0,
    batch: Annotated[int, typer.Option(help="replies decoded together (one forward per token for all)")] = 32,
    epochs: Annotated[int, typer.Option(help="training epochs (0: make the data and stop)")] = 10,
    lr: Annotated[float, typer.Option()] = 5e-4,
    unroll: Annotated[
        int,
        typer.Option(help="EAGLE-3's training-time test: steps in which the head reads its own predicted features"),
    ] = 1,
    pack: Annotated[
        int,
        typer.Option(help="rows per training step: whole sequences packed until they reach it (0: one per step)"),
    ] = 2048,
    init: Annotated[
        Path | None,
        typer.Option("--init", help="go on training this head file (for this target) instead of a new head"),
    ] = None,
    also: Annotated[
        list[Path] | None,
        typer.Option("--also", help="train also on the data another train-draft run made in DIR (repeatable)"),
    ] = None,
    max_steps: Annotated[int, typer.Option("--max-steps", help="stop after N optimizer steps (0 = all)")] = 0,
    draft_vocab: Annotated[
        int, typer.Option("--draft-vocab", help="tokens the head scores: the target's most written (0 = all)")
    ] = 0,
    rows_: Annotated[
        str,
        typer.Option(
            "--rows",
            help="rows in the loss and the held-out top-1: reply (the replies' rows only: a draft never runs in the "
            "prompt), all, or auto (reply where the target has a chat template)",
        ),
    ] = "auto",
    soft: Annotated[
        bool,
        typer.Option(
            "--soft/--greedy",
            help="learn the target's whole next-token distribution (EAGLE-3's loss; recomputed from the data) or "
            "its greedy token alone",
        ),
    ] = False,
    vocab_for: Annotated[
        Path | None,
        typer.Option("--vocab-for", help="only write the draft vocabulary from DIR's data into this head file"),
    ] = None,
    eagle3: Annotated[
        bool,
        typer.Option(
            "--eagle3",
            help="train an EAGLE-3 head (fc over three of the target's layers; data records them) into DIR/eagle3, "
            "for --draft eagle:DIR/eagle3",
        ),
    ] = False,
    head_layers: Annotated[
        int,
        typer.Option(
            "--head-layers",
            help="an --eagle3 head's decoder layers (published heads have 1; each further one a plain layer, started "
            "as adding nothing, so --init from a 1-layer head starts as that head)",
        ),
    ] = 1,
    device: Annotated[str, typer.Option(help="cpu | cuda:N | mps")] = "cpu",
    dtype: Annotated[
        str,
        typer.Option(help="auto | fp32 | bf16: the target's run and the training's products (auto: measured here)"),
    ] = "auto",
) -> None:
    """Generate training data with the target (once), then train a draft head on it (resumable)."""
    quiet_libraries()
    keep_freed_memory()
    with user_errors():
        texts: list[str] = []
        from homespec.model.train_head import (
            Sequences,
            TrainConfig,
            build_data,
            draft_vocabulary,
            load_prompts,
            train,
        )

        if builtin:
            texts += load_prompts(BUILTIN_PROMPTS)
        if prompts is not None:
            if not prompts.is_file():
                raise ConfigError(f"prompts file not found: {prompts}")
            texts += load_prompts(prompts)
        if limit > 0:
            texts = texts[:limit]
        if not texts and self_written <= 0:
            raise ConfigError("no training prompts", hint="drop --no-builtin or give --prompts FILE")
        if self_written < 0:
            raise ConfigError(f"--self-prompts must be >= 0, got {self_written}")
        if samples < 1 or batch < 1 or not temperature > 0:
            raise ConfigError(
                f"need --samples >= 1, --batch >= 1, --temperature > 0 (got {samples}, {batch}, {temperature})"
            )
        if epochs < 0:
            raise ConfigError(f"--epochs must be >= 0, got {epochs}")
        if not 1 <= unroll <= 8:
            raise ConfigError(f"--unroll must be in [1, 8], got {unroll}")
        if rows_ not in ("auto", "all", "reply"):
            raise ConfigError(f"--rows must be auto, all or reply, got {rows_!r}")
        if dtype not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"--dtype must be auto, fp32 or bf16, got {dtype!r}")
        if not 1 <= head_layers <= 8 or (head_layers > 1 and not eagle3):
            raise ConfigError(f"--head-layers must be in [1, 8], and above 1 only with --eagle3 (got {head_layers})")
        if dtype == "auto":
            dtype, why = fastest_dtype(device)
            typer.echo(why, err=True)
        if eagle3 and vocab_for is not None:
            raise ConfigError("--vocab-for writes a HomeSpec head's vocabulary; an --eagle3 head holds its own")
        cfg = TrainConfig(
            max_new=max_new,
            epochs=epochs,
            lr=lr,
            unroll=unroll,
            dtype=dtype,
            pack=pack,
            soft=soft,
            head_layers=head_layers,
        )
        if init is not None and not (init.is_file() or (eagle3 and init.is_dir())):
            raise ConfigError(f"head file not found: {init}")
        if vocab_for is not None and not vocab_for.is_file():
            raise ConfigError(f"head file not found: {vocab_for}")
        more = [_made_data(d) for d in also or []]
        from rich.progress import Progress

        from homespec.engine import Engine, EngineOptions

        legacy = out / "data.safetensors"  # one file: what runs before the shards wrote
        # float weights: the head trains through the target's own LM head, and torch's int4/int8 products have no
        # gradient (a head trained on the float target drafts for its int4 run too: drafts never change the output);
        # in bf16 where this device's matrix units make it much faster (data and training, BENCHMARKS.md §3)
        options = EngineOptions(model=model, draft=DEFAULT_DRAFT, device=device, dtype=dtype, weights=dtype)
        with Engine(options) as engine:
            if eagle3:
                from homespec.model.eagle import default_taps

                cfg = dataclasses.replace(cfg, taps=default_taps(int(engine.source.config.num_hidden_layers)))
            if self_written and not legacy.is_file():
                texts += _self_written(engine, out / "self_prompts.jsonl", self_written, seed)
            if legacy.is_file():
                data = Sequences.load(legacy)
            else:
                with Progress(transient=True) as bar:
                    task = bar.add_task("training data", total=len(texts))

                    def shard(index: int, count: int, made: int, seconds: float) -> None:
                        bar.console.print(
                            f"data shard {index + 1}/{count}: {made} rows in {seconds:.0f} s "
                            f"({made / max(seconds, 1e-9):.0f} rows/s, {dtype})"
                        )

                    data = build_data(
                        engine,
                        texts,
                        cfg.max_new,
                        lambda: bar.advance(task),
                        samples,
                        temperature,
                        batch,
                        shards=out / "data",
                        on_shard=shard,
                        record=cfg.taps,
                        seed=seed,
                    )
            for folder in more:  # each folder's prompts stay apart: a prompt's replies are held out together
                data.extend(Sequences.load_shards(folder) if folder.is_dir() else Sequences.load(folder), groups=True)
            if rows_ == "auto":
                rows_ = "reply" if getattr(engine.tokenizer, "chat_template", None) else "all"
            if rows_ == "reply":
                from homespec.model.train_head import reply_header

                data.mark_replies(reply_header(engine.tokenizer))
            rows = sum(len(t) - 1 for t in data.tokens)
            said = f"{len(data.tokens)} sequences, {rows} training rows"
            if data.starts:
                said += f", {data.scored_rows()} of them in the replies"
            typer.echo(said, err=True)
            if epochs == 0:
                return
            size = int(engine.source.config.vocab_size)
            if not 0 <= draft_vocab <= size:
                raise ConfigError(f"--draft-vocab must be in [0, {size}], got {draft_vocab}")
            vocab = draft_vocabulary(data.tokens, size, draft_vocab) if 0 < draft_vocab < size else None
            if vocab_for is not None:
                from homespec.model.head import write_vocab

                write_vocab(vocab_for, engine.source.config, vocab)
                typer.echo(str(vocab_for))
                return
            log: list[dict[str, float]] = []

            def report(m: dict[str, float]) -> None:
                log.append(m)
                deep = " ".join(f"{v:.3f}" for k, v in m.items() if k.startswith("top1_d"))
                typer.echo(
                    f"epoch {int(m['epoch'])}: loss {m['loss']:.4f}, held-out top-1 by depth {deep} ({m['s']:.0f}s)",
                    err=True,
                )

            with Progress(transient=True) as bar:
                total = max_steps or cfg.epochs * len(data.tokens)
                task = bar.add_task("training", total=total)
                start = None if init is None else _init_head(init, engine, cfg)
                head = train(
                    engine, data, out, cfg, report, _ticker(bar, task, "training"), max_steps or None, start, vocab
                )
            extra = {
                "prompts": len(texts),
                "samples": samples,
                "temperature": temperature,
                "rows": rows,
                "max_new": cfg.max_new,
                "epochs": cfg.epochs,
                "unroll": cfg.unroll,
                "dtype": cfg.dtype,
                "pack": cfg.pack,
                "scored": rows_,
                "soft": cfg.soft,
                "head_layers": cfg.head_layers,
                "init": None if init is None else str(init),
                "draft_vocab": 0 if vocab is None else len(vocab),
                "log": log,
            }
            (out / "training.json").write_text(json.dumps(extra, indent=2))
            from homespec.model.eagle import Eagle3Trainable

            if isinstance(head, Eagle3Trainable):  # a draft vocabulary as ids: it drafts through the target's rows
                made = head.save(out / "eagle3", engine.source.config, extra, vocab)
            else:
                head.vocab = vocab
                made = out / "head.safetensors"
                head.save(made, extra)
        typer.echo(str(made))


BF16_GAIN = 2.0  # bf16 is chosen where its products run at least this many times fp32's


def fastest_dtype(device: str) -> tuple[str, str]:
    """bf16 where this device multiplies in bf16 at least ``BF16_GAIN`` times faster than in fp32 (matrix units: AMX
    or AVX-512 BF16 on a CPU, tensor cores on a GPU; the profile's own micro-benchmark), else fp32; and the line
    that says so."""
    import torch

    from homespec.profiling.microbench import matmul_tflops

    fp32, bf16 = (matmul_tflops(torch, device, d, budget_s=0.3) for d in ("fp32", "bf16"))
    pick = "bf16" if bf16 >= BF16_GAIN * fp32 > 0 else "fp32"
    return pick, f"dtype: {pick} (matmul here: bf16 {bf16:.2f} TFLOP/s, fp32 {fp32:.2f}; --dtype to choose)"


def _init_head(path: Path, engine: Any, cfg: Any) -> Any:
    """The head ``--init`` names, to go on training: a HomeSpec head file, or (``--eagle3``) an EAGLE-3 head's folder
    or weights file as ``train-draft --eagle3`` writes it (without an LM head of its own)."""
    config = engine.source.config
    if not cfg.taps:
        from homespec.model.head import load_head

        return load_head(path, config)
    from homespec.model.eagle import eagle_config, read_eagle
    from homespec.model.train_head import new_eagle3

    raw, tensors = read_eagle(path)
    got = eagle_config(raw, tensors, config)
    if got.version != 3 or got.draft_vocab or got.taps != cfg.taps or got.layers > cfg.head_layers:
        raise ConfigError(
            f"--init {path} is not an EAGLE-3 head over layers {list(cfg.taps)} without an LM head of its own, of at "
            f"most --head-layers {cfg.head_layers} layers",
            hint="go on from a folder train-draft --eagle3 wrote",
        )
    head = new_eagle3(engine, cfg.taps, cfg.head_layers)
    head.load_tensors(tensors)
    return head


def _made_data(folder: Path) -> Path:
    """The data another train-draft run made in ``folder``: its shards' folder, or its one legacy file."""
    if any((folder / "data").glob("[0-9][0-9][0-9][0-9][0-9].safetensors")):
        return folder / "data"
    if (folder / "data.safetensors").is_file():
        return folder / "data.safetensors"
    raise ConfigError(
        f"--also {folder}: no training data there", hint="make it: homespec train-draft --out DIR --epochs 0"
    )


def _self_written(engine: object, path: Path, count: int, seed: int = 0, batch: int = 128) -> list[str]:
    """``count`` requests the target writes itself, made once into ``path`` (JSONL with ``turns``, as ``--prompts``
    takes) and read back from it by a resumed run; the bench prompts (where ../shared holds them) are excluded.
    While they are made, each batch's requests go to ``path`` + ``.journal``, so a run stopped midway goes on from
    its last whole batch (``self_prompts``' journal) and makes the same list."""
    from homespec.cli.bench import DEFAULT_PROMPTS
    from homespec.model.train_head import load_prompts, self_prompts

    if path.is_file():
        return load_prompts(path)
    exclude = load_prompts(DEFAULT_PROMPTS) if DEFAULT_PROMPTS.is_file() else []
    journal = path.with_name(path.name + ".journal")
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("self-written prompts", total=count)
        tick = _ticker(bar, task, "self-written prompts", every_s=0.0)
        made = self_prompts(engine, count, batch=batch, seed=seed, exclude=exclude, progress=tick, journal=journal)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"category": "self", "turns": [t]}) + "\n" for t in made))
    tmp.replace(path)
    journal.unlink(missing_ok=True)
    typer.echo(f"{len(made)} self-written prompts -> {path}", err=True)
    return made


def _ticker(bar: Any, task: Any, what: str, every_s: float = 60.0) -> Callable[..., None]:
    """A progress callback for ``bar``'s ``task``: called with a count, it sets it; with none, it adds one. Where
    stderr is not a terminal (a long run's log) the bar is not drawn, so a line with the count and the seconds
    spent is written every ``every_s`` seconds instead."""
    import sys

    start = last = time.monotonic()

    def tick(n: int | None = None) -> None:
        nonlocal last
        if n is None:
            bar.advance(task)
        else:
            bar.update(task, completed=n)
        now = time.monotonic()
        if not sys.stderr.isatty() and now - last >= every_s:
            last = now
            got = next(t for t in bar.tasks if t.id == task)
            typer.echo(f"{what}: {got.completed:.0f}/{got.total:.0f}, {now - start:.0f} s", err=True)

    return tick
