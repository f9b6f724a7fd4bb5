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
def test_auto_runs_the_bundled_gguf_in_int4_on_every_stage(chat_ids: Any) -> None:
    """``--weights auto`` on the bundled GGUF: every stage process of a pipelined engine loads its own layers as
    int4 (what each holds, reported per stage), and its tokens, greedy and seeded, are the in-process int4 run's.
    Every mode and stage count in int4 is tests/test_pipeline.py's matrix; this checks the default and the stats."""
    from homespec.config import GenerationConfig, SamplingConfig
    from homespec.engine import Engine, EngineOptions
    from homespec.events import GenerationFinished

    ids = chat_ids(EQUIVALENCE_PROMPTS[1])
    configs = [GenerationConfig(max_tokens=12), GenerationConfig(12, SamplingConfig(temperature=0.8, seed=7))]

    def run(engine: Any) -> list[list[int]]:
        out = []
        for config in configs:
            done = next(e for e in engine.generate(ids, config) if isinstance(e, GenerationFinished))
            stages = engine.stage_count(engine.options.mode)
            assert done.stats.weights == "int4" and len(done.stats.weight_bytes) == stages
            assert all(0 < b < 100e6 for b in done.stats.weight_bytes)  # the whole int4 model holds 94.9 MB
            out.append(list(done.tokens))
        return out

    with Engine(EngineOptions(draft="none")) as plain:
        assert plain.options.weights == "int4" and "GGUF Q4_1" in plain.notice
        want = run(plain)
    with Engine(EngineOptions(mode="specpipe", stages=4, draft="ngram")) as engine:
        assert [a.weights for a in engine.backend.cluster.assigns] == ["int4"] * 4
        assert run(engine) == want


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
