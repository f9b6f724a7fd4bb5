"""Partial downloads (model/fetch.py) through the real ``huggingface_hub`` code path, offline: a sharded safetensors
copy of the bundled model served by a local stand-in for the hub (tests/fake_hub.py). The index decides which shards
a stage reads, and only those are fetched; two workers with their own caches serve a generation identical to the
bundled model's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EQUIVALENCE_PROMPTS
from tests.fake_hub import FakeHub
from tests.workers import HOMESPEC, free_port_block, pair, start_worker, stop

REPO = "local/smollm2-sharded"
SHARDS = 5
PER_SHARD = 6  # decoder layers per shard; the embedding is in the first, the final norm in the last


@pytest.fixture(scope="module")
def sharded(bundled: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled model as a 5-shard safetensors repo with its index (a real model, smaller than the real hub's)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("smollm2-sharded")
    shards: list[dict[str, Any]] = [{} for _ in range(SHARDS)]
    with safe_open(str(bundled.folder / "model.safetensors"), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118
            if name.startswith("model.layers."):
                k = int(name.split(".")[2]) // PER_SHARD
            else:
                k = 0 if "embed_tokens" in name else SHARDS - 1
            shards[k][name] = f.get_tensor(name)
    weight_map, total = {}, 0
    for k, tensors in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{SHARDS:05d}.safetensors"
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    for file in bundled.folder.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, out / file.name)
    return out


@pytest.fixture(scope="module")
def hub(sharded: Path) -> Iterator[FakeHub]:
    server = FakeHub({REPO: sharded})
    yield server
    server.close()


def hub_env(hub: FakeHub, home: Path) -> dict[str, str]:
    return {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_OFFLINE": "0"}


def shard(k: int) -> str:
    return f"model-{k:05d}-of-{SHARDS:05d}.safetensors"


def cached_shards(home: Path) -> set[str]:
    return {p.name for p in home.rglob("*.safetensors")}


PROBE = """
import json, sys
from homespec.model.loader import resolve
from homespec.model.stage import Stage
source = resolve(sys.argv[1])
out = {"open": list(source.hub.fetched), "stages": []}
for a, b in json.loads(sys.argv[2]):
    fetched, read = len(source.hub.fetched), len(source.tensors_read)
    Stage(source, a, b)
    files = sorted({source.weight_map[n] for n in source.tensors_read[read:]})
    out["stages"].append({"read": files, "fetched": source.hub.fetched[fetched:]})
print(json.dumps(out))
"""

# stage layers -> the shards it must read: layers 6-11 and 12-17; the embedding lives with layers 0-5; the last
# stage reads its layers, the final norm, and the tied embedding as its LM head
CASES = [((7, 13), {2, 3}), ((0, 4), {1}), ((24, 30), {5, 1})]


def test_a_stage_fetches_only_the_shards_that_hold_its_tensors(hub: FakeHub, tmp_path: Path) -> None:
    layers = [list(c[0]) for c in CASES]
    out = subprocess.run(
        [sys.executable, "-c", PROBE, REPO, json.dumps(layers)],
        env=hub_env(hub, tmp_path),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert "config.json" in got["open"] and "model.safetensors.index.json" in got["open"]
    assert not [f for f in got["open"] if f.endswith(".safetensors")], "opening the model fetched weights"
    seen: set[str] = set()
    for (_, want), stage in zip(CASES, got["stages"], strict=True):
        assert set(stage["read"]) == {shard(k) for k in want}
        assert set(stage["fetched"]) == set(stage["read"]) - seen  # what it reads and the cache lacked, only
        seen |= set(stage["read"])
    assert cached_shards(tmp_path) == seen and len(seen) == 4  # shard 4 (layers 18-23) was never needed


@pytest.mark.slow
def test_two_workers_each_fetch_their_shards_and_generate_the_bundled_models_tokens(
    hub: FakeHub, sharded: Path, tmp_path: Path, chat_ids: Any, reference_greedy: Any, assert_lossless: Any
) -> None:
    head_config, homes = tmp_path / "head", {n: tmp_path / f"hf-{n}" for n in ("head", "w1", "w2")}
    procs, ports = [], []
    try:
        for name in ("w1", "w2"):
            pair(tmp_path / name, head_config)
            ports.append(free_port_block())
            procs.append(start_worker(tmp_path / name, ports[-1], name, env=hub_env(hub, homes[name])))
        workers = ",".join(f"127.0.0.1:{p}" for p in ports)
        prompt = EQUIVALENCE_PROMPTS[1]
        env = {**hub_env(hub, homes["head"]), "HOMESPEC_CONFIG": str(head_config)}
        cmd = [HOMESPEC, "generate", REPO, prompt, "--workers", workers, "--stages", "2", "--draft", "ngram"]
        out = subprocess.run([*cmd, "-n", "32", "--json"], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert_lossless(chat_ids(prompt), result["tokens"], reference_greedy(chat_ids(prompt), 32))
        index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
        stage_files = [cached_shards(homes[n]) for n in ("w1", "w2")]
        assert cached_shards(homes["head"]) == set(), "the head (ngram draft) read no weights"
        assert all(stage_files) and stage_files[0] | stage_files[1] == set(index.values())
        assert stage_files[0] != set(index.values()) or stage_files[1] != set(index.values())
        assert len(stage_files[0]) + len(stage_files[1]) < 2 * SHARDS, "each worker fetched only its part"
    finally:
        stop(procs)
