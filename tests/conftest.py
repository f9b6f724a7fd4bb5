"""Shared fixtures: the real bundled model (dequantized once into a session cache), its transformers reference,
engines per draft source, and a truncated safetensors copy used as a second, smaller draft model."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# The suite runs on two pytest-xdist workers over CI's two cores: each test process, and every process it starts
# (CLI, server; stage processes already do), computes on one torch thread. Two-thread OpenMP pools in two busy
# processes on two cores spin against each other: an in-process speculative run measured 3.4x slower that way.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

# Varied prompts for equivalence tests: chat, summarization of a given paragraph, code rewrite, math, QA.
EQUIVALENCE_PROMPTS = [
    "Write a haiku about GPUs.",
    "Summarize in two sentences: The James Webb Space Telescope is the largest optical telescope in space. Its "
    "high resolution and sensitivity allow it to view objects too old, distant, or faint for the Hubble Space "
    "Telescope. This enables investigations across many fields of astronomy and cosmology, such as observation "
    "of the first stars and the formation of the first galaxies.",
    "Rewrite this Python function to use a list comprehension:\n\ndef squares(xs):\n    out = []\n    for x in xs:\n"
    "        out.append(x * x)\n    return out",
    "What is 17 times 23? Show your steps.",
    "Explain what a hash table is to a beginner.",
    "Translate to French: The weather is nice today and I want to go for a walk in the park.",
    "List three tips for staying focused while studying.",
    "If a train travels 60 miles per hour for 2.5 hours, how far does it go?",
]


@pytest.fixture(scope="session")
def bundled() -> Any:
    from homespec.model.loader import resolve

    return resolve(None)


@pytest.fixture(scope="session")
def tokenizer(bundled: Any) -> Any:
    return bundled.tokenizer()


@pytest.fixture(scope="session")
def reference_model(bundled: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(bundled.folder), dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="session")
def chat_ids(tokenizer: Any) -> Callable[[str], list[int]]:
    def encode(prompt: str) -> list[int]:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    return encode


@pytest.fixture(scope="session")
def reference_greedy(reference_model: Any) -> Callable[[Sequence[int], int], list[int]]:
    """transformers' own greedy ``generate`` (cached per prompt)."""
    import torch

    cache: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def run(prompt_ids: Sequence[int], n: int) -> list[int]:
        key = (tuple(prompt_ids), n)
        if key not in cache:
            ids = torch.tensor([list(prompt_ids)])
            with torch.no_grad():
                out = reference_model.generate(
                    ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids)
                )
            cache[key] = [int(t) for t in out[0, ids.shape[1] :]]
        return cache[key]

    return run


#: Near-tie excuses (DESIGN §4.4) granted this session: (test, token index, top-two gap). Reported at the end of the
#: run; more than MAX_EXCUSES in a session, or more than one in a reply, fails it.
EXCUSES: list[tuple[str, int, float]] = []
MAX_EXCUSES = 3
TIE_GAP = 1e-4


@pytest.fixture(scope="session")
def reference_continuation(reference_model: Any) -> Callable[[Sequence[int], int], list[int]]:
    """transformers' greedy continuation of ``ids`` by up to ``n`` tokens (stopping at EOS, as ``generate`` does)."""
    import torch

    def run(ids: Sequence[int], n: int) -> list[int]:
        if n <= 0:
            return []
        x = torch.tensor([list(ids)])
        with torch.no_grad():
            out = reference_model.generate(x, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(x))
        return [int(t) for t in out[0, x.shape[1] :]]

    return run


@pytest.fixture(scope="session")
def assert_lossless(
    reference_model: Any, reference_continuation: Callable[[Sequence[int], int], list[int]], tokenizer: Any
) -> Callable[[Sequence[int], Sequence[int], Sequence[int]], None]:
    """Our whole reply must equal the reference (transformers' greedy ``generate`` for as many tokens): the same
    length, or shorter only when ours ends in EOS. A divergence is excused only at a numeric tie of the target
    (top-two logit gap under TIE_GAP there, with our token one of the two), proved with the reference model; the
    excuse is recorded (EXCUSES, reported at the end of the run), and the comparison goes on against a reference
    regenerated from our prefix, so the rest of the reply is still checked token for token."""
    import torch

    eos = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()

    def check(prompt_ids: Sequence[int], ours: Sequence[int], ref: Sequence[int]) -> None:
        ours, ref, n = list(ours), list(ref), len(ref)
        excused = 0
        for i, a in enumerate(ours):
            assert i < len(ref), f"ours is longer than the reference ({len(ours)} vs {len(ref)} tokens)"
            if a == ref[i]:
                continue
            with torch.no_grad():
                logits = reference_model(torch.tensor([[*prompt_ids, *ours[:i]]])).logits[0, -1]
            top = torch.topk(logits, 2)
            gap = float(top.values[0] - top.values[1])
            assert gap < TIE_GAP and a in top.indices.tolist(), (
                f"diverged at token {i}: ours {a}, reference {ref[i]}, top-two gap {gap:.3g} (not a tie)"
            )
            excused += 1
            assert excused <= 1, f"a second near tie in one reply (token {i}, gap {gap:.3g})"
            test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
            EXCUSES.append((test, i, gap))
            print(f"near-tie excuse: {test} token {i}, top-two gap {gap:.3g}")
            ref = ours[: i + 1] + reference_continuation([*prompt_ids, *ours[: i + 1]], n - i - 1)
        whole = len(ours) == len(ref) or (ours and ours[-1] in eos)
        assert whole, f"a reply of {len(ours)} tokens against a reference of {len(ref)} (and ours ends in no EOS)"

    return check


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist, on the controller: gather each worker's excuses (sent in its ``workeroutput``; a worker that
    crashed sends none, and its crash is reported by xdist, not hidden behind an error here)."""
    output = getattr(node, "workeroutput", {})
    EXCUSES.extend(tuple(e) for e in json.loads(output.get("homespec_excuses", "[]")))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if hasattr(terminalreporter.config, "workerinput"):
        return  # a worker: the controller reports for all
    terminalreporter.write_line(f"near-tie excuses granted: {len(EXCUSES)} (at most {MAX_EXCUSES})")
    for test, i, gap in EXCUSES:
        terminalreporter.write_line(f"  {test}: token {i}, top-two gap {gap:.3g}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if hasattr(session.config, "workerinput"):  # a worker: hand the excuses to the controller
        session.config.workeroutput["homespec_excuses"] = json.dumps(EXCUSES)  # type: ignore[attr-defined]
        return
    if len(EXCUSES) > MAX_EXCUSES and exitstatus == 0:
        session.exitstatus = 1  # more ties than the model plausibly has: something is wrong, not tied


@pytest.fixture(scope="session")
def truncated_copy(bundled: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real, smaller model with the same tokenizer: the bundled model's first 10 layers, as safetensors."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    keep = 10
    out = tmp_path_factory.mktemp("smollm2-10layers")
    tensors = {}
    with safe_open(str(bundled.folder / "model.safetensors"), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118
            if name.startswith("model.layers.") and int(name.split(".")[2]) >= keep:
                continue
            tensors[name] = f.get_tensor(name)
    save_file(tensors, str(out / "model.safetensors"))
    config = json.loads((bundled.folder / "config.json").read_text())
    config["num_hidden_layers"] = keep
    (out / "config.json").write_text(json.dumps(config))
    for file in bundled.folder.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
            shutil.copy(file, out / file.name)
    return out


@pytest.fixture(scope="session")
def engines(truncated_copy: Path) -> Callable[..., Any]:
    """Engines on the bundled model, built once per (draft, split, weights): fp32 by default, the dequantized Q4_1
    weights transformers runs (``--weights auto`` runs the GGUF's own int4 blocks)."""
    from homespec.engine import Engine, EngineOptions

    built: dict[tuple[str, int, str], Any] = {}

    def get(draft: str = "none", split: int = 1, weights: str = "fp32") -> Any:
        spec = draft.replace("{truncated}", str(truncated_copy))
        if (spec, split, weights) not in built:
            built[(spec, split, weights)] = Engine(EngineOptions(draft=spec, split=split, weights=weights))
        return built[(spec, split, weights)]

    return get
