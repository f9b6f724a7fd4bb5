"""Model resolution: the bundled GGUF (cached once), folders, sharded indexes, clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from homespec.errors import ModelError
from homespec.model.loader import bundled_gguf, gguf_cache_folder, open_folder, resolve


def test_bundled_model_resolves_to_cached_safetensors(bundled: Any) -> None:
    assert bundled_gguf().suffix == ".gguf"
    assert bundled.folder == gguf_cache_folder(bundled_gguf())
    assert (bundled.folder / "model.safetensors").is_file()
    assert bundled.config.model_type == "llama" and bundled.num_layers == 30
    assert bundled.tied_embeddings
    again = resolve(None)  # from the cache: same folder, no re-conversion
    assert again.folder == bundled.folder


def test_sharded_folder_reads_through_index(bundled: Any, tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    names: dict[str, str] = {}
    with safe_open(str(bundled.folder / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        half = len(keys) // 2
        for i, part in enumerate((keys[:half], keys[half:])):
            file = f"model-{i + 1:05d}-of-00002.safetensors"
            save_file({k: f.get_tensor(k) for k in part}, str(tmp_path / file))
            names.update(dict.fromkeys(part, file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": names}))
    (tmp_path / "config.json").write_text((bundled.folder / "config.json").read_text())
    source = open_folder(tmp_path, "sharded")
    assert source.weight_map == names
    t = source.read(["model.layers.29.mlp.up_proj.weight"], dtype=__import__("torch").float32, device="cpu")
    assert t["model.layers.29.mlp.up_proj.weight"].shape == (1536, 576)


def test_missing_and_wrong_models_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="model not found"):
        resolve(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match=r"no config\.json"):
        resolve(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelError, match=r"no \*\.safetensors"):
        open_folder(tmp_path, "x")
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve(str(tmp_path / "x.gguf"))
