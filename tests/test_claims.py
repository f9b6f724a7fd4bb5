"""README claims that no other test covers, each against the real part: ``version``, the ``hint:`` line of a bad
command, ``prepare``, stages in fp16 and bf16, ``--emulate`` keeping the output exact, ``bench --concurrency``
giving every request its solo tokens, and logprobs under sampling being the target's raw ones."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EQUIVALENCE_PROMPTS
from tests.test_cli import PROFILES, homespec


def test_version_prints_the_installed_version() -> None:
    out = homespec("version")
    assert out.returncode == 0 and out.stdout.strip() == version("homespec")


def test_a_bad_command_says_error_and_hint_and_exits_2() -> None:
    """README: bad input exits with code 2 and a one-line ``error:`` plus a ``hint:``."""
    out = homespec("bench", "--concurrency", "1,2", "--stages", "1")
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "error: --concurrency measures the pipelined modes",
        "hint: --stages >= 2, --modes tree,specpipe",
    ]


@pytest.mark.slow
def test_prepare_resolves_the_bundled_model(bundled: Any) -> None:
    out = homespec("prepare")
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip().splitlines()[-1]
    assert re.fullmatch(rf".+: llama, {bundled.num_layers} layers, hidden \d+, vocab \d+ -> (.+)", line), line
    folder = Path(line.rsplit(" -> ", 1)[1])
    assert folder == Path(bundled.folder) and (folder / "config.json").is_file()
    assert any(folder.glob("*.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_stages_in_half_precision_give_the_single_process_tokens(dtype: str, chat_ids: Any) -> None:
    """``--dtype fp16|bf16``: the weights are that dtype on every stage, and a 2-stage specpipe run with a draft
    gives the single-process run's tokens in the same dtype (transformers' fp32 output is not the reference here:
    half precision rounds differently)."""
    import torch

    from homespec.config import GenerationConfig
    from homespec.engine import Engine, EngineOptions
    from homespec.events import GenerationFinished

    def run(engine: Any) -> list[list[int]]:
        out = []
        for prompt in EQUIVALENCE_PROMPTS[:2]:
            events = engine.generate(chat_ids(prompt), GenerationConfig(max_tokens=24))
            out.append(next(list(e.tokens) for e in events if isinstance(e, GenerationFinished)))
        return out

    with Engine(EngineOptions(dtype=dtype, weights=dtype, draft="none")) as single:
        want = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        stage = single.decoder_for("ar").stages[0]
        weights = [t for layer in stage.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]
        assert weights and {t.dtype for t in [*weights, stage.embed_w, stage.head_w]} == {want}
        plain = run(single)
    with Engine(EngineOptions(dtype=dtype, weights=dtype, stages=2, mode="specpipe", draft="ngram")) as pipeline:
        assert [a.dtype for a in pipeline.backend.cluster.assigns] == [dtype, dtype]
        assert run(pipeline) == plain


@pytest.mark.slow
def test_emulation_keeps_the_output_exact(chat_ids: Any, reference_greedy: Any, assert_lossless: Any) -> None:
    """``--emulate`` pads stages and links to a profile's modeled times; the math is the same: transformers' greedy
    tokens, in specpipe on 3 stages with a draft."""
    prompt = EQUIVALENCE_PROMPTS[3]
    out = homespec(
        "generate", prompt, "--stages", "3", "--mode", "specpipe", "--draft", "ngram", "-n", "24", "--json",
        "--emulate", str(PROFILES / "home-mixed-wifi.json"), "--weights", "fp32",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["stats"]["stages"] == 3 and result["stats"]["time_scale"] > 0
    assert_lossless(chat_ids(prompt), result["tokens"], reference_greedy(chat_ids(prompt), 24))


@pytest.mark.slow
def test_bench_concurrency_gives_every_request_its_solo_tokens(tmp_path: Path) -> None:
    """``bench --concurrency 1,3``: at each level every request's tokens equal its solo run (one digest over all
    rows), and batching 3 requests takes fewer pipeline steps than serving them one by one."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"turns": [p]}) + "\n" for p in EQUIVALENCE_PROMPTS[:3]))
    out = homespec(
        "bench", "--stages", "2", "--modes", "specpipe", "--drafts", "ngram", "--concurrency", "1,3",
        "--prompts", str(prompts), "--max-tokens", "12", "--json", str(tmp_path / "rows.json"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["mode"], r["draft"], r["concurrency"]) for r in rows] == [
        ("specpipe", "ngram", 1),
        ("specpipe", "ngram", 3),
    ]
    assert rows[0]["output_sha256"] == rows[1]["output_sha256"]
    assert "every level gave every request its solo tokens" in out.stdout
    assert rows[0]["tokens"] == rows[1]["tokens"] and rows[1]["steps"] < rows[0]["steps"]


@pytest.mark.slow
def test_logprobs_under_sampling_are_the_target_s_raw_ones(
    engines: Callable[..., Any], chat_ids: Any, reference_model: Any
) -> None:
    """At temperature 0.8 with top-p 0.9, each token's logprob and its alternatives are transformers' log-softmax of
    the raw logits at that position (before temperature and top-p), and the most probable is first."""
    import torch

    from homespec.config import GenerationConfig, SamplingConfig
    from homespec.events import GenerationFinished

    ids = chat_ids(EQUIVALENCE_PROMPTS[4])
    config = GenerationConfig(max_tokens=16, sampling=SamplingConfig(temperature=0.8, top_p=0.9, seed=11))
    done = list(engines("ngram").generate(ids, config))[-1]
    assert isinstance(done, GenerationFinished)
    out = list(done.tokens)
    assert len(done.logprobs) == len(out) == 16
    with torch.no_grad():
        logp = torch.log_softmax(reference_model(torch.tensor([ids + out])).logits[0].double(), -1)
    for i, lp in enumerate(done.logprobs):
        want = logp[len(ids) - 1 + i]
        assert lp.token == out[i]
        assert abs(lp.logprob - float(want[out[i]])) < 1e-3, (i, lp.logprob, float(want[out[i]]))
        top_ids = [t for t, _ in lp.top]
        assert top_ids[0] == int(want.argmax())
        assert all(abs(v - float(want[t])) < 1e-3 for t, v in lp.top)
    assert any(lp.logprob < max(v for _, v in lp.top) for lp in done.logprobs), "every token was the argmax"
