"""The EAGLE-style draft head: training lowers its loss, the saved file loads only for its own target, and the
shipped head for the bundled model drafts losslessly and is accepted more often than it would be by chance."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from homespec.config import GenerationConfig, TreeConfig
from homespec.errors import DraftError
from homespec.events import GenerationFinished
from homespec.model.head import load_head
from homespec.model.train_head import Sequences, TrainConfig, build_data, draft_vocabulary, train
from tests.conftest import EQUIVALENCE_PROMPTS

pytestmark = pytest.mark.slow

TRAIN_PROMPTS = [
    "Name three colors of the rainbow.",
    "Write one sentence about the moon.",
    "What is the capital of Italy?",
]


def test_training_lowers_the_loss_and_the_head_loads_for_its_target_only(
    engines: Callable[..., Any], truncated_copy: Path, tmp_path: Path
) -> None:
    engine = engines("none")
    data = build_data(engine, TRAIN_PROMPTS, max_new=12, progress=lambda: None)
    data.save(tmp_path / "data.safetensors")
    data = Sequences.load(tmp_path / "data.safetensors")
    assert [len(t) for t in data.tokens] == [len(f) for f in data.features] == [len(y) for y in data.labels]
    assert data.groups == [0, 1, 2]
    log: list[dict[str, float]] = []
    cfg = TrainConfig(epochs=6, lr=1e-3, holdout=0.34, pack=0)
    head = train(engine, data, tmp_path, cfg, log.append)
    assert [int(m["epoch"]) for m in log] == list(range(6))
    assert {"top1_d1", "top1_d2", "top1_d3"} <= set(log[-1])  # depths past the training's own are reported too
    assert log[-1]["loss"] < 0.8 * log[0]["loss"], f"loss did not go down: {[m['loss'] for m in log]}"
    head.save(tmp_path / "head.safetensors")
    loaded = load_head(tmp_path / "head.safetensors", engine.source.config)
    assert loaded.cfg == head.cfg
    from homespec.model.loader import resolve

    with pytest.raises(DraftError, match="trained for another model"):
        load_head(tmp_path / "head.safetensors", resolve(str(truncated_copy)).config)
    # resuming after the last epoch does nothing more and gives the same head
    again = train(engine, data, tmp_path, cfg, log.append)
    assert len(log) == 6
    assert all((a == b).all() for a, b in zip(again.state_dict().values(), head.state_dict().values(), strict=True))
    # a run stopped within an epoch (checkpoints within it: every step here) goes on after its last saved pack
    # and ends with the weights of the run that was not stopped
    short = dataclasses.replace(cfg, epochs=2)
    whole = train(engine, data, tmp_path / "whole", short, lambda _: None)
    packs_seen: list[int] = []

    def stop() -> None:
        packs_seen.append(1)
        if len(packs_seen) == 4:  # the second epoch's second (last) pack, after its step, before its checkpoint
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(engine, data, tmp_path / "stopped", short, lambda _: None, stop, checkpoint_s=0.0)
    state = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 0 and state["within"]["epoch"] == 1 and state["within"]["packs"] == 1
    went_on: list[dict[str, float]] = []
    resumed = train(engine, data, tmp_path / "stopped", short, went_on.append, checkpoint_s=0.0)
    assert [int(m["epoch"]) for m in went_on] == [1]
    assert all((a == b).all() for a, b in zip(resumed.state_dict().values(), whole.state_dict().values(), strict=True))


def test_shipped_head_is_lossless_and_accepted(
    engines: Callable[..., Any],
    chat_ids: Callable[[str], list[int]],
    reference_greedy: Callable[..., list[int]],
    assert_lossless: Callable[..., None],
) -> None:
    engine = engines("head")
    accepted = forwards = 0
    for prompt in EQUIVALENCE_PROMPTS[:4]:
        ids = chat_ids(prompt)
        done = list(engine.generate(ids, GenerationConfig(max_tokens=48, tree=TreeConfig())))[-1]
        assert isinstance(done, GenerationFinished)
        assert_lossless(ids, list(done.tokens), reference_greedy(ids, 48))
        accepted += round(done.stats.accepted_per_step * done.stats.target_forwards)
        forwards += done.stats.target_forwards
    assert accepted / forwards > 0.2, f"the shipped head is accepted only {accepted / forwards:.2f} per forward"


def test_draft_vocabulary_takes_the_most_written_tokens_then_the_lowest_ids() -> None:
    import torch

    vocab = draft_vocabulary([torch.tensor([5, 5, 5, 9, 9]), torch.tensor([2, 9])], vocab_size=12, k=4)
    assert vocab.tolist() == [0, 2, 5, 9]  # 9 and 5 (written most), 2, then the lowest unseen id
    with pytest.raises(ValueError, match="0 < k"):
        draft_vocabulary([], 12, 0)


def test_a_head_with_a_draft_vocabulary_scores_those_tokens_and_stays_lossless(
    engines: Callable[..., Any],
    chat_ids: Callable[[str], list[int]],
    reference_greedy: Callable[..., list[int]],
    assert_lossless: Callable[..., None],
    tmp_path: Path,
) -> None:
    """``train-draft --vocab-for`` writes the vocabulary into a head file (weights unchanged); the head then scores
    the vocabulary and the prompt's tokens only in ``ar`` (every token beside a pipeline), and the output is still
    the target's own."""
    import shutil

    import torch

    from homespec.model.drafts import SHIPPED_HEADS
    from homespec.model.head import write_vocab

    config = engines("none").source.config
    path = tmp_path / "head.safetensors"
    shutil.copy(sorted(SHIPPED_HEADS.glob("*.safetensors"))[0], path)
    vocab = draft_vocabulary([torch.tensor(chat_ids(p)) for p in EQUIVALENCE_PROMPTS], int(config.vocab_size), 4096)
    write_vocab(path, config, vocab)
    before, after = load_head(sorted(SHIPPED_HEADS.glob("*.safetensors"))[0], config), load_head(path, config)
    assert after.vocab is not None and torch.equal(after.vocab, vocab)
    assert all(
        torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values(), strict=True)
    )
    engine = engines(f"head:{path}")
    draft = engine.build_draft(f"head:{path}")
    accepted = 0
    for prompt in EQUIVALENCE_PROMPTS[:2]:
        ids = chat_ids(prompt)
        draft.start(ids)
        assert set(draft.columns.tolist()) == set(vocab.tolist()) | set(ids)
        assert draft._head_w.shape[0] == len(draft.columns)
        done = list(engine.generate(ids, GenerationConfig(max_tokens=32, tree=TreeConfig())))[-1]
        assert isinstance(done, GenerationFinished)
        assert_lossless(ids, list(done.tokens), reference_greedy(ids, 32))
        accepted += round(done.stats.accepted_per_step * done.stats.target_forwards)
    assert accepted > 0
    draft.set_mode("specpipe")  # beside a pipeline the head's forwards are free: every token is scored
    draft.start(chat_ids(EQUIVALENCE_PROMPTS[0]))
    assert draft.columns is None and draft._head_w is None and draft.lm_unit == draft._lm_full
    draft.set_mode("ar")
    draft.start(chat_ids(EQUIVALENCE_PROMPTS[0]))
    assert draft.columns is not None and draft.lm_unit < draft._lm_full


LABEL_TIE = 1e-3  # logits apart less than this are a near-tie that float rounding may order either way


def test_batched_replies_are_the_targets_own(
    engines: Callable[..., Any], reference_greedy: Callable[..., list[int]], assert_lossless: Callable[..., None]
) -> None:
    """Training data decoded in batches: each prompt's first reply is the target's greedy one, the others are
    sampled (and differ), and every recorded feature and label is what one forward over the whole sequence gives."""
    import torch

    engine = engines("none")
    done: list[int] = []
    data = build_data(engine, TRAIN_PROMPTS, 16, lambda: done.append(1), samples=3, temperature=1.0, batch=4)
    assert data.groups == [0, 0, 0, 1, 1, 1, 2, 2, 2] and len(done) == 3
    stage = engine.decoder_for("ar").stages[0]
    for i, prompt in enumerate(TRAIN_PROMPTS):
        ids = engine.encode(prompt)
        greedy = data.tokens[3 * i].tolist()
        assert greedy[: len(ids)] == ids
        reply, ref = greedy[len(ids) :], reference_greedy(ids, 16)
        assert_lossless(ids, reply, ref[: len(reply)])
        assert len(reply) == 16 or ref[len(reply)] in engine.eos_ids  # an EOS drawn has no feature: not kept
        assert any(data.tokens[3 * i + k].tolist() != greedy for k in (1, 2)), "sampled replies equal greedy"
    for seq, feats, labels in zip(data.tokens, data.features, data.labels, strict=True):
        cache = stage.new_cache(len(seq) + 1, 1)
        logits = stage.forward_prefix(cache, seq, range(len(seq)))
        torch.testing.assert_close(feats.float(), stage.last_hidden, atol=2e-2, rtol=1e-2)
        # every label is the whole-sequence forward's argmax, or ties with it: the batched decoding's logits differ
        # from it by float rounding only, so a label that differs must be within LABEL_TIE of the top logit
        gap = logits.max(-1).values - logits.gather(-1, labels[:, None]).squeeze(-1)
        assert bool((gap <= LABEL_TIE).all()), f"labels off the argmax by {gap.max():.2e} (> {LABEL_TIE})"


def test_training_data_in_shards_resumes_where_it_stopped(
    engines: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``build_data(shards=DIR)``: each group of prompts is written as it ends; a run after an interruption (a shard
    missing) makes only what is missing, and the data are the same as one run's; other settings are refused."""
    import torch

    from homespec.errors import ConfigError
    from homespec.model import train_head

    monkeypatch.setattr(train_head, "SHARD_PROMPTS", 1)
    engine = engines("none")
    made: list[int] = []

    def run() -> Sequences:
        return build_data(
            engine, TRAIN_PROMPTS, 8, lambda: None, 2, 1.0, 4, shards=tmp_path, on_shard=lambda i, *_: made.append(i)
        )

    first = run()
    assert made == [0, 1, 2] and sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "00000.safetensors",
        "00001.safetensors",
        "00002.safetensors",
    ]
    (tmp_path / "00001.safetensors").unlink()  # interrupted while this shard was being made
    made.clear()
    again = run()
    assert made == [1]
    assert again.groups == first.groups and sorted(first.groups) == [0, 0, 1, 1, 2, 2]
    for a, b in zip(first.tokens + first.labels, again.tokens + again.labels, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(first.features, again.features, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ConfigError, match="max_new"):
        build_data(engine, TRAIN_PROMPTS, 9, lambda: None, 2, 1.0, 4, shards=tmp_path)


@pytest.mark.slow
def test_train_draft_on_the_command_line_makes_a_head_that_generate_uses(
    tmp_path: Path, chat_ids: Callable[[str], list[int]], reference_greedy: Any, assert_lossless: Any
) -> None:
    """``homespec train-draft`` end to end, kept tiny (2 prompts, 8 reply tokens, 2 optimizer steps, the target's
    whole distribution as the label: ``--soft``): it writes ``head.safetensors``, and ``generate --draft head:FILE``
    uses that head and gives transformers' tokens."""
    from tests.test_cli import homespec

    out = homespec("train-draft", "--limit", "2", "--max-new", "8", "--samples", "1", "--epochs", "1",
                   "--max-steps", "2", "--draft-vocab", "2048", "--soft", "--out", str(tmp_path))  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    head = tmp_path / "head.safetensors"
    assert head.is_file() and json.loads((tmp_path / "training.json").read_text())["soft"] is True
    prompt = EQUIVALENCE_PROMPTS[6]
    gen = homespec("generate", prompt, "--draft", f"head:{head}", "-n", "16", "--json", "--weights", "fp32")
    assert gen.returncode == 0, gen.stderr[-3000:]
    result = json.loads(gen.stdout.strip().splitlines()[-1])
    assert result["stats"]["draft"] == "head"
    assert_lossless(chat_ids(prompt), result["tokens"], reference_greedy(chat_ids(prompt), 16))


def test_train_draft_trains_also_on_data_other_runs_made(tmp_path: Path) -> None:
    """``--also DIR`` adds the data another ``train-draft`` run made (its shards) to this run's: the rows add up, and
    the other run's prompts are new groups (a prompt's replies are held out together, never mixed with another's);
    ``--seed`` reaches the data's plan; with a chat template only the replies' rows are scored (``--rows auto``). A
    folder without data, a ``--rows`` that is not a choice and ``--head-layers`` without ``--eagle3`` are refused
    before the model loads."""
    from homespec.model.train_head import Sequences
    from tests.test_cli import homespec

    tiny = ("--max-new", "8", "--samples", "1", "--epochs", "0", "--dtype", "fp32")
    a, b = tmp_path / "a", tmp_path / "b"
    assert homespec("train-draft", "--limit", "2", *tiny, "--out", str(a)).returncode == 0
    out = homespec("train-draft", "--limit", "1", *tiny, "--seed", "3", "--out", str(b), "--also", str(a))
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((b / "data" / "plan.json").read_text())["seed"] == 3  # another seed: other sampled data
    mine, theirs = Sequences.load_shards(b / "data"), Sequences.load_shards(a / "data")
    rows = sum(len(t) - 1 for d in (mine, theirs) for t in d.tokens)
    assert f"{len(mine.tokens) + len(theirs.tokens)} sequences, {rows} training rows" in out.stderr
    scored = re.search(r"training rows, (\d+) of them in the replies", out.stderr)  # --rows auto: a chat template
    assert scored is not None and 0 < int(scored[1]) < rows // 2, out.stderr[-2000:]
    both = Sequences.load_shards(b / "data")
    both.extend(theirs, groups=True)
    first = {both.group_of(i) for i in range(len(mine.tokens))}
    assert first.isdisjoint(both.group_of(i) for i in range(len(mine.tokens), len(both.tokens)))
    bad = homespec("train-draft", "--limit", "1", *tiny, "--out", str(b), "--also", str(tmp_path / "none"))
    assert bad.returncode != 0 and "no training data there" in bad.stderr
    bad = homespec("train-draft", "--limit", "1", *tiny, "--out", str(b), "--rows", "prompt")
    assert bad.returncode != 0 and "--rows must be auto, all or reply" in bad.stderr
    from homespec.cli.main import app  # (in this process: the refusal comes before the model loads)

    bad_ = CliRunner().invoke(app, ["train-draft", "--limit", "1", *tiny, "--out", str(b), "--head-layers", "2"])
    assert bad_.exit_code != 0 and "above 1 only with --eagle3" in bad_.output  # not an EAGLE-3 head


def test_the_target_writes_its_own_prompts(
    engines: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Magpie (``self_prompts``): the bundled model continues its own empty user header into requests that ended
    with its end-of-turn token; the same seed gives the same list, excluded texts never come back, and train-draft
    writes them once into DIR/self_prompts.jsonl, which a resumed run reads instead of generating again; a run
    stopped midway goes on from its journal's last whole batch and makes the same list."""
    from homespec.cli import train_draft as cli
    from homespec.errors import ConfigError, ModelError
    from homespec.model import train_head

    engine = engines("none")
    header = engine.tokenizer.decode(train_head.user_header(engine.tokenizer))
    assert header.endswith("<|im_start|>user\n") and "<|im_start|>system" in header
    journal = tmp_path / "run.journal"  # (batch i draws with its own seed: a run stopped midway goes on from its
    got = train_head.self_prompts(engine, 3, max_len=40, batch=2, journal=journal)  # journal, making the same list)
    assert 1 <= len(got) <= 3 and len(set(got)) == len(got)
    assert all("<|im_" not in t and len(t.split()) >= 3 for t in got)
    lines = journal.read_text().splitlines(keepends=True)
    assert len(lines) >= 3 and json.loads(lines[0])["settings"]["batch"] == 2
    journal.write_text(lines[0] + lines[1] + lines[2][:9])  # the second batch's line cut off by the stop
    heard: list[int] = []
    assert train_head.self_prompts(engine, 3, max_len=40, batch=2, journal=journal, progress=heard.append) == got
    assert journal.read_text().splitlines(keepends=True) == lines and len(heard) == len(lines) - 1
    with pytest.raises(ConfigError, match="written with"):
        train_head.self_prompts(engine, 3, max_len=40, batch=4, journal=journal)
    assert got[0] not in train_head.self_prompts(engine, 3, max_len=40, batch=8, exclude=[got[0].upper()])
    assert train_head.self_prompts(engine, 3, max_len=40, batch=8, seed=1) != got  # another seed, other requests

    path = tmp_path / "self_prompts.jsonl"
    made = cli._self_written(engine, path, 2, batch=8)
    assert not (tmp_path / "self_prompts.jsonl.journal").exists()
    assert 1 <= len(made) <= 2 and train_head.load_prompts(path) == made

    def refuse(*_: Any, **__: Any) -> list[str]:
        raise AssertionError("generated again")

    monkeypatch.setattr(train_head, "self_prompts", refuse)
    assert cli._self_written(engine, path, 2, batch=8) == made
    asked: dict[str, Any] = {}  # train-draft --seed reaches the draws

    def spy(*_: Any, **kw: Any) -> list[str]:
        asked.update(kw)
        return ["three words here"]

    monkeypatch.setattr(train_head, "self_prompts", spy)
    assert cli._self_written(engine, tmp_path / "other.jsonl", 2, seed=5) == ["three words here"]
    assert asked["seed"] == 5

    class Plain:
        chat_template = None

    with pytest.raises(ModelError, match="chat template"):
        train_head.user_header(Plain())


def test_reply_rows_are_the_only_rows_scored(engines: Callable[..., Any]) -> None:
    """``train-draft --rows reply``: each sequence's reply begins after the chat template's assistant header (the
    prompt's own length, as the engine encodes it), and the loss and the held-out top-1 score only the rows that
    predict a reply token (row r predicts the token at position r + 2); without marks every row is scored."""
    from homespec.model import train_head

    engine = engines("none")
    stage = engine.decoder_for("ar").stages[0]
    data = build_data(engine, TRAIN_PROMPTS[:2], max_new=6, progress=lambda: None)
    header = train_head.reply_header(engine.tokenizer)
    assert engine.tokenizer.decode(header) == "<|im_end|>\n<|im_start|>assistant\n"
    head = train_head.new_head(engine)
    cfg = TrainConfig(unroll=2, pack=0)
    ids = list(range(len(data.tokens)))
    _, every = train_head._loss(head, stage, data, ids, cfg, False)
    assert [rows for _, rows in every] == [sum(len(t) - 1 - j for t in data.tokens) for j in range(2)]
    data.mark_replies(header)
    assert data.starts == [len(engine.encode(TRAIN_PROMPTS[g])) for g in data.groups]
    _, reply = train_head._loss(head, stage, data, ids, cfg, False)
    want = [sum(len(t) - 1 - max(j, s - 2) for t, s in zip(data.tokens, data.starts, strict=True)) for j in range(2)]
    assert [rows for _, rows in reply] == want and 0 < want[0] < every[0][1] // 3
    data.extend(build_data(engine, TRAIN_PROMPTS[2:], max_new=6, progress=lambda: None), groups=True)
    assert len(data.starts) == len(data.tokens) and data.starts[-1] == 0  # unmarked data: every row


def test_the_training_time_test_attends_as_a_draft_would(engines: Callable[..., Any], tmp_path: Path) -> None:
    """EAGLE-3's training-time test (``unrolled``, ``ttt_mask``): each unrolled step's row r equals a draft written
    out by hand, one row at a time: the true rows up to r - j in the head's past, then the chain of its own
    predictions at rows r - j + 1 .. r - 1 (each from the step before), then row r reading the previous step's
    prediction at r - 1. Sequences packed into one step's rows give what each gives alone. Training with three steps,
    several sequences per step, lowers the loss and reports the held-out top-1 at each depth."""
    import torch

    from homespec.model import train_head

    def close(got: torch.Tensor, want: torch.Tensor) -> None:  # fp32 in another order: ~1e-6 of the rows' largest
        torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=1e-4)  # (~170 here)

    engine = engines("none")
    stage = engine.decoder_for("ar").stages[0]
    head = train_head.new_head(engine)
    gen = torch.Generator().manual_seed(0)
    n = 9
    tokens = torch.randint(0, 2000, (n + 1,), generator=gen)
    feats = torch.randn(n + 1, stage.hidden, generator=gen)
    emb = stage.embed(tokens[1:])
    cos, sin = stage.rope(range(n))
    with torch.no_grad():
        preds = train_head.unrolled(head, emb, feats[:-1], feats[0], cos, sin, 3)
        assert len(preds) == 3
        # the true rows' keys: step 0 is EAGLE's causal pass
        _, k0, v0 = head(emb, feats[:-1], cos, sin, torch.ones(n, n, dtype=torch.bool).tril())
        for r in range(2, n):
            chain_k, chain_v, feat = [k0[:, : r - 1]], [v0[:, : r - 1]], feats[r - 2]  # depth 1 from row r - 2
            for depth, row in enumerate(range(r - 1, r + 1)):  # rows r - 1 (step 1), r (step 2)
                past = (torch.cat(chain_k, 1), torch.cat(chain_v, 1))
                one = slice(row, row + 1)
                mask = torch.ones(1, past[0].shape[1] + 1, dtype=torch.bool)
                if depth == 0:  # step 1 reads step 0's prediction at row r - 2
                    feat = preds[0][r - 2]
                out, k, v = head(emb[one], feat[None], cos[one], sin[one], mask, past)
                close(out[0], preds[depth + 1][row])
                chain_k.append(k)
                chain_v.append(v)
                feat = out[0]
        # packed after another sequence (one training step's rows), each gives what it gives alone
        m = 5
        tokens2, feats2 = (
            torch.randint(0, 2000, (m + 1,), generator=gen),
            torch.randn(m + 1, stage.hidden, generator=gen),
        )
        emb2, (cos2, sin2) = stage.embed(tokens2[1:]), stage.rope(range(m))
        alone = train_head.unrolled(head, emb2, feats2[:-1], feats2[0], cos2, sin2, 3)
        packed = train_head.unrolled(
            head,
            torch.cat([emb2, emb]),
            torch.cat([feats2[:-1], feats[:-1]]),
            torch.stack([feats2[0], feats[0]]),
            torch.cat([cos2, cos]),
            torch.cat([sin2, sin]),
            3,
            [m, n],
        )
        for j in range(3):
            close(packed[j][:m], alone[j])
            close(packed[j][m:], preds[j])

    data = build_data(engine, TRAIN_PROMPTS, max_new=12, progress=lambda: None)
    log: list[dict[str, float]] = []
    cfg = TrainConfig(epochs=4, lr=1e-3, holdout=0.34, unroll=3, pack=40)
    train(engine, data, tmp_path, cfg, log.append)
    assert log[-1]["loss"] < 0.8 * log[0]["loss"], f"loss did not go down: {[m['loss'] for m in log]}"
    assert all(0.0 <= log[-1][f"top1_d{d}"] <= 1.0 for d in (1, 2, 3)) and log[-1]["top1"] == log[-1]["top1_d1"]


def test_training_in_bf16_lowers_the_loss(tmp_path: Path) -> None:
    """``train-draft --dtype bf16``: the target runs in bf16 and the head's products in bf16 autocast, its weights,
    optimizer and losses in fp32; ``init`` goes on training a given head."""
    from homespec.engine import Engine, EngineOptions

    with Engine(EngineOptions(draft="none", dtype="bf16", weights="bf16")) as engine:
        data = build_data(engine, TRAIN_PROMPTS, max_new=12, progress=lambda: None)
        assert data.features[0].dtype in (torch.bfloat16, torch.float16, torch.float32)
        log: list[dict[str, float]] = []
        head = train(
            engine, data, tmp_path, TrainConfig(epochs=6, lr=1e-3, holdout=0.34, dtype="bf16", pack=40), log.append
        )
        assert all(p.dtype == torch.float32 for p in head.parameters())
        assert log[-1]["loss"] < 0.8 * log[0]["loss"], f"loss did not go down: {[m['loss'] for m in log]}"
        # ``--init``: training goes on from a head (the shipped one), which already predicts better than a new one
        from homespec.model.drafts import SHIPPED_HEADS

        shipped = load_head(sorted(SHIPPED_HEADS.glob("*.safetensors"))[0], engine.source.config)
        before = shipped.fc.weight.detach().clone()
        cfg = TrainConfig(epochs=1, lr=1e-4, holdout=0.34, dtype="bf16", pack=40)
        went_on: list[dict[str, float]] = []
        assert train(engine, data, tmp_path / "init", cfg, went_on.append, max_steps=2, init=shipped) is shipped
    assert not torch.equal(shipped.fc.weight, before) and went_on[0]["loss"] < log[0]["loss"]


def test_the_head_drafts_through_the_targets_own_weight_format(engines: Callable[..., Any]) -> None:
    """The target's embeddings and LM head that a head reuses run as the engine's stages hold them: int8 in an int4
    run (the GGUF's Q8_0 embedding), the float tensors in an fp32 one."""
    from homespec.model.quant import Int8Channel

    assert isinstance(engines("head", weights="int4")._drafts["head"].stage.head_w, Int8Channel)
    assert isinstance(engines("head")._drafts["head"].stage.head_w, torch.Tensor)


@given(st.lists(st.integers(1, 50), min_size=1, max_size=40), st.integers(0, 120), st.integers(0, 3))
def test_packs_hold_every_sequence_once_and_reach_their_rows(lengths: list[int], rows: int, seed: int) -> None:
    """A training step packs whole sequences until they reach ``rows`` (0: one each); every sequence in one step."""
    import random

    from homespec.model.train_head import packs

    got = packs(range(len(lengths)), lengths, rows, random.Random(seed))
    assert sorted(i for p in got for i in p) == list(range(len(lengths)))
    for p in got[:-1]:
        assert sum(lengths[i] for i in p) >= rows and (len(p) == 1 or sum(lengths[i] for i in p[:-1]) < rows)
    assert rows > 0 or all(len(p) == 1 for p in got)


def test_the_head_keeps_its_rows_across_a_verification_and_its_prefix_is_a_fresh_catch_ups(bundled: Any) -> None:
    """specpipe's trees outlive many verifications: the head keeps the surviving subtree's rows and moves the
    accepted path's into its prefix, rewriting the rows that read its own predicted feature. That prefix holds the
    same keys and values as a head that catches up on the committed tokens from the target's features alone."""
    from homespec.core.tree import TokenTree
    from homespec.model.drafts import build_draft

    draft = build_draft("head", bundled, None, TreeConfig(depth=6, width=4), torch.float32, weights="fp32")
    hidden = int(bundled.config.hidden_size)
    gen = torch.Generator().manual_seed(0)
    prompt = [1, 9690, 198, 2683, 314, 260, 3575, 282, 4649, 47]
    draft.start(prompt)
    draft.prefix_features(0, torch.randn(len(prompt) - 1, hidden, generator=gen))
    tree = TokenTree(prompt[-1], len(prompt) - 1)
    assert draft.propose(tree, prompt, 24) > 0
    root = tree.root.id
    a = next(iter(tree.node(root).children.values()))
    b = next(iter(tree.node(a).children.values()))
    assert b in draft.cache.slot_of and not draft.row_true[a]  # a's row read the head's own feature for the root
    tree.mark_sent([root, a, b])
    draft.tree_features([root, a], torch.randn(2, hidden, generator=gen))  # the target computed root and a
    tree.set_result(root, tree.node(a).token)
    tree.set_result(a, tree.node(b).token)
    v = tree.verify()
    assert v.committed == (root, a) and v.root == b
    committed = [*prompt, *v.emitted]
    kept = [n for n in tree.subtree(b) if n in draft.cache.slot_of]
    draft.observe(v, committed)
    cache = draft.cache
    assert cache.prefix_len == len(committed) - 2 and kept and all(n in cache.slot_of for n in kept)

    fresh = build_draft("head", bundled, None, TreeConfig(), torch.float32, weights="fp32")
    fresh.start(prompt)
    fresh.features = list(draft.features)
    fresh._catch_up(committed)
    n = cache.prefix_len
    assert fresh.cache.prefix_len == n
    torch.testing.assert_close(cache.k[:, :, :n], fresh.cache.k[:, :, :n], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache.v[:, :, :n], fresh.cache.v[:, :, :n], rtol=1e-4, atol=1e-4)


def test_soft_targets_are_the_targets_own_distribution_and_train_the_head(
    engines: Callable[..., Any], tmp_path: Path
) -> None:
    """``train-draft --soft`` (EAGLE-3's loss: the cross-entropy against the target's whole next-token distribution):
    ``soft_targets`` recomputes that distribution from the data, row r's at position r + 1. From an EAGLE-1 head's
    data (the last hidden states) it is the LM head's softmax, whose argmax is the recorded greedy label; from an
    EAGLE-3 head's (the streams entering layers 2, 15, 27), the target's layers from 27 on over the last stream
    (``Stage.forward_from``) give the same distribution as the whole forward; with a draft vocabulary it is over
    those tokens, renormalized. Training on it lowers the loss."""
    from homespec.model import train_head

    engine = engines("none")
    stage = engine.target_stages()[0]
    plain = build_data(engine, TRAIN_PROMPTS[:2], max_new=8, progress=lambda: None)
    ids = [1, 0]  # any order: rows as ``_loss`` packs them
    p = train_head.soft_targets(stage, plain, ids, ())
    y = torch.cat([plain.labels[i][1:] for i in ids])
    assert p.shape == (len(y), int(engine.source.config.vocab_size))
    torch.testing.assert_close(p.float().sum(-1), torch.ones(len(y)), atol=0.02, rtol=0)
    assert torch.equal(p.float().argmax(-1), y)

    taps = (2, 15, 27)
    streams = build_data(engine, TRAIN_PROMPTS[:2], max_new=8, progress=lambda: None, record=taps)
    q = train_head.soft_targets(stage, streams, ids, taps)
    whole = train_head.soft_targets(stage, plain, ids, ())
    assert torch.equal(torch.cat([streams.tokens[i] for i in ids]), torch.cat([plain.tokens[i] for i in ids]))
    assert (q.float() - whole.float()).abs().sum(-1).max() < 0.1  # (the streams are stored in bf16)
    assert (q.float().argmax(-1) == y).float().mean() > 0.95
    vocab = torch.tensor(sorted({*range(2000), *y.tolist()}))
    dv = train_head.DraftVocab.of(stage, vocab)
    cut = train_head.soft_targets(stage, streams, ids, taps, dv)
    assert cut.shape == (len(y), len(vocab))
    torch.testing.assert_close(
        cut.float(), (q.float()[:, vocab] / q.float()[:, vocab].sum(-1, keepdim=True)), atol=0.01, rtol=0.05
    )

    log: list[dict[str, float]] = []
    cfg = TrainConfig(epochs=4, lr=1e-3, holdout=0.34, unroll=2, pack=40, taps=taps, soft=True)
    data = build_data(engine, TRAIN_PROMPTS, max_new=12, progress=lambda: None, record=taps)
    train(engine, data, tmp_path / "soft", cfg, log.append)
    assert log[-1]["loss"] < 0.8 * log[0]["loss"], f"loss did not go down: {[m['loss'] for m in log]}"
