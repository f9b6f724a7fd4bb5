"""The command line: help, exit codes and one-line errors, and ``generate --json`` as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from homespec.cli.common import DEFAULT_DRAFT
from homespec.cli.main import app

BENCH = Path(__file__).resolve().parents[2] / "shared" / "bench" / "specbench-dev.jsonl"
PROFILES = Path(__file__).resolve().parents[1] / "profiles"
runner = CliRunner()


def homespec(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "homespec"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=600, env=env)


def test_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "generate" in result.output and "prepare" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "/no/such/model", "hi"], "model not found"),
        (["generate", "a", "b", "c"], "expected [MODEL] PROMPT"),
        (["generate", "hi", "--temperature", "-1"], "temperature must be"),
        (["generate", "hi", "--top-p", "0"], "top_p must be"),
        (["generate", "hi", "--max-tokens", "0"], "max_tokens must be"),
        (["generate", "hi", "--draft", "bogus"], "unknown draft source"),
        (["generate", "hi", "--draft", "early-exit:99"], "early-exit needs a layer count"),
        (["generate", "hi", "--tree-budget", "0"], "tree budget must be in"),
        (["generate", "hi", "--mode", "warp"], "mode 'warp' is not available"),
        (["generate", "hi", "--dtype", "fp8"], "unknown dtype"),
    ],
)
def test_bad_input_exits_non_zero_with_one_line_error(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert f"error: {message}" in result.output
    assert "Traceback" not in result.output


def test_unsupported_architecture_names_the_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    result = runner.invoke(app, ["generate", str(tmp_path), "hi"])
    assert result.exit_code == 2
    assert "unsupported architecture 'gpt2'" in result.output and "llama, mistral, qwen2" in result.output


@pytest.mark.slow
def test_generate_json_on_summarization_with_ngram_reports_real_acceptance() -> None:
    """Spec-Bench summarization prompt, prompt lookup: tokens per forward >= 1.5, from real acceptance."""
    prompts = [json.loads(line) for line in BENCH.read_text().splitlines()]
    prompt = next(p for p in prompts if p["question_id"] == 251)["turns"][0]
    out = homespec("generate", prompt, "--draft", "ngram", "--max-tokens", "64", "--json")
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout.strip().splitlines()[-1])
    stats = payload["stats"]
    assert set(stats) >= {"tokens", "target_forwards", "tokens_per_forward", "accepted_per_step", "wall_s",
                          "tokens_per_s", "draft", "mode"}  # fmt: skip
    assert stats["tokens"] == len(payload["tokens"]) == 64
    assert stats["tokens_per_forward"] >= 1.5
    # every token is an accepted draft or the one fresh token of its forward (the last forward's fresh token may be
    # cut by --max-tokens): so forwards <= 64 / 1.5, and the accepted drafts the run counted make up the rest
    forwards = stats["target_forwards"]
    assert forwards <= 64 / 1.5
    assert 64 - forwards <= round(stats["accepted_per_step"] * forwards) <= 64 - forwards + 1
    # the same tokens as plain decoding
    plain = homespec("generate", prompt, "--draft", "none", "--max-tokens", "64", "--json")
    assert json.loads(plain.stdout.strip().splitlines()[-1])["tokens"] == payload["tokens"]


@pytest.mark.slow
def test_generate_streams_text_to_stdout() -> None:
    out = homespec("generate", "Write a haiku about GPUs", "--max-tokens", "16", "--stats")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.strip()) > 10
    assert "tokens/forward" in out.stderr


@pytest.mark.slow
def test_generate_with_stages_reports_steps(tmp_path: Path) -> None:
    out = homespec(
        "generate", "What is 2 + 2?", "--stages", "2", "--mode", "pp", "-n", "8", "--json", "--draft", "none",
        "--emulate", str(PROFILES / "home-mixed-wifi.json"), "--time-scale", "1.5",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout.strip().splitlines()[-1])["stats"]
    assert stats["mode"] == "pp" and stats["stages"] == 2 and stats["time_scale"] == 1.5
    assert stats["steps"] == 2 * stats["tokens"] and stats["tokens_per_step"] == pytest.approx(0.5)
    assert len(stats["busy_fraction"]) == 2 and all(0 < b <= 1 for b in stats["busy_fraction"])


@pytest.mark.slow
def test_bench_runs_every_mode_in_one_run(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"turns": ["Repeat after me: one two three, one two three."]}) + "\n")
    out = homespec(
        "bench", "--stages", "3", "--prompts", str(prompts), "--max-tokens", "12", "--emulate",
        str(PROFILES / "home-8x3090-1gbe.json"), "--json", str(tmp_path / "rows.json"), "--weights", "fp32",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rows = {(r["mode"], r["draft"]): r for r in json.loads((tmp_path / "rows.json").read_text())}
    draft = DEFAULT_DRAFT
    assert set(rows) == {
        ("ar", "none"), ("ar", draft), ("hf", "transformers"), ("hf-lookup", "transformers"), ("pp", "none"),
        ("tree", draft), ("specpipe", draft),
    }  # fmt: skip
    pp = rows[("pp", "none")]
    assert pp["steps"] == 3 * pp["tokens"] and pp["speedup_vs_pp"] == pytest.approx(1.0)
    # every mode and transformers gave the same greedy tokens, prompt by prompt (and bench says so)
    assert {r["output_sha256"] for r in rows.values()} == {rows[("hf", "transformers")]["output_sha256"]}
    assert "every row gave the same tokens" in out.stdout
    assert rows[("hf", "transformers")]["steps"] == pp["tokens"]  # one forward per token
    assert rows[("specpipe", draft)]["predicted_tbt_ms"] > 0
    spec = rows[("specpipe", draft)]
    assert spec["by_category"]["-"]["tokens_per_step"] == pytest.approx(spec["tokens_per_step"])
    assert len(spec["hit_by_depth"]) == 8 and all(0.0 <= h <= 1.0 for h in spec["hit_by_depth"])
