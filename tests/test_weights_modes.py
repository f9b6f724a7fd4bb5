"""Quantized weights across the decoding modes (``--weights int4``, model/formats.py): every mode and stage count
gives the in-process int4 run's tokens, greedy and seeded, and ``bench`` measures formats side by side. Its own file
so the two test workers share the long runs with tests/test_weights.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EQUIVALENCE_PROMPTS
from tests.test_cli import homespec


@pytest.mark.slow
def test_int4_is_token_identical_in_every_mode_and_stage_count(chat_ids: Any) -> None:
    """``--weights int4``: ``ar`` in process is the reference; ``tree`` and ``specpipe`` at S = 1, 4 and 8 (stage
    processes loading their own int4 layers) give its tokens, greedy and seeded (with a draft in process and in 4
    stages)."""
    from homespec.config import GenerationConfig, SamplingConfig
    from homespec.engine import Engine, EngineOptions
    from homespec.events import GenerationFinished

    prompts = [chat_ids(p) for p in EQUIVALENCE_PROMPTS[:2]]
    greedy = GenerationConfig(max_tokens=24)
    seeded = GenerationConfig(max_tokens=24, sampling=SamplingConfig(temperature=0.8, top_p=0.95, seed=7))

    def run(engine: Any, config: Any) -> list[list[int]]:
        out = []
        for ids in prompts:
            done = next(e for e in engine.generate(ids, config) if isinstance(e, GenerationFinished))
            stages = engine.stage_count(engine.options.mode)
            assert done.stats.weights == "int4" and len(done.stats.weight_bytes) == stages
            assert all(0 < b < 160e6 for b in done.stats.weight_bytes)  # the whole int4 model holds 148 MB
            out.append(list(done.tokens))
        return out

    with Engine(EngineOptions(weights="int4", draft="none")) as plain:
        want_greedy, want_seeded = run(plain, greedy), run(plain, seeded)
    assert all(len(t) == 24 for t in want_greedy)
    for mode, stages, draft in (("tree", 1, "ngram"), ("specpipe", 4, "ngram"), ("specpipe", 8, "ngram+recycle")):
        with Engine(EngineOptions(weights="int4", mode=mode, stages=stages, draft=draft)) as engine:  # type: ignore[arg-type]
            assert [a.weights for a in engine.backend.cluster.assigns] == ["int4"] * stages
            assert run(engine, greedy) == want_greedy, (mode, stages)
            if stages == 4:
                assert run(engine, seeded) == want_seeded
    with Engine(EngineOptions(weights="int4", draft="ngram")) as drafted:
        assert run(drafted, seeded) == want_seeded


@pytest.mark.slow
def test_bench_adds_rows_per_weight_format(tmp_path: Path) -> None:
    """``bench --weights auto,fp32,int4``: ``auto`` is int4 on the bundled GGUF (said in one line), so two formats
    are measured, int4 once; every mode in each, each format's rows token-identical among themselves (and said so
    per format), transformers' rows once, among the fp32 rows (the dequantized weights they run)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"turns": ["Name three colours."]}) + "\n")
    out = homespec(
        "bench", "--stages", "2", "--prompts", str(prompts), "--max-tokens", "10", "--modes", "ar,hf,pp,specpipe",
        "--drafts", "ngram", "--weights", "auto,fp32,int4", "--json", str(tmp_path / "rows.json"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())
    got = {(r["weights"], r["mode"], r["draft"]) for r in rows}
    assert {w for w, _, _ in got} == {"fp32", "int4"}
    assert ("fp32", "hf", "transformers") in got and ("int4", "hf", "transformers") not in got
    assert "weights: int4, the GGUF Q4_1 file's own 4-bit blocks (--weights fp32 dequantizes them)" in out.stderr
    for fmt in ("fp32", "int4"):
        assert {(m, d) for w, m, d in got if w == fmt} >= {("ar", "none"), ("pp", "none"), ("specpipe", "ngram")}
        assert len({r["output_sha256"] for r in rows if r["weights"] == fmt}) == 1
        assert f"{fmt} weights: every row gave the same tokens" in out.stdout
