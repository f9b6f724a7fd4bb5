"""Only what is read, from the Hugging Face hub: a model's small files at once, each safetensors shard the first time
a tensor in it is read (DESIGN §6: a worker fetches only the shards that hold its layers).

``open_hub(repo_id)`` downloads ``config.json``, the safetensors index (when the repo is sharded), the generation
config and the tokenizer's files into the standard Hugging Face cache (``hf_hub_download``, with its progress bar),
and returns the snapshot folder with a ``HubFiles`` that ``ModelSource.read`` asks for a shard before opening it.
Which shards a stage needs is the index's business: a tensor name maps to exactly one file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from homespec.errors import ModelError

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SMALL_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


@dataclass
class HubFiles:
    """Downloads files of one repo revision on demand; remembers what it fetched (for tests and logs)."""

    repo_id: str
    revision: str | None = None
    fetched: list[str] = field(default_factory=list)

    def get(self, name: str, required: bool = True) -> Path | None:
        """The local path of ``name`` (downloaded now unless cached), or None when the repo has no such file and
        it is not ``required``."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import RemoteEntryNotFoundError

        try:
            path = Path(hf_hub_download(self.repo_id, name, revision=self.revision))
        except RemoteEntryNotFoundError:
            if required:
                raise ModelError(f"{self.repo_id} has no file {name}") from None
            return None
        except Exception as exc:  # the hub raises many types: offline, 404, gated, auth
            raise ModelError(
                f"cannot fetch {name} of {self.repo_id!r} from the Hugging Face hub: {type(exc).__name__}: {exc}",
                hint="check the repo id and network, or pass a local folder",
            ) from exc
        self.fetched.append(name)
        return path

    def ensure(self, folder: Path, files: set[str]) -> None:
        """Make sure each of ``files`` is in ``folder`` (the snapshot), downloading the missing ones."""
        for name in sorted(files):
            if not (folder / name).is_file():
                log.info("fetching %s of %s", name, self.repo_id)
                self.get(name)


def open_hub(repo_id: str, revision: str | None = None) -> tuple[Path, HubFiles]:
    """The snapshot folder of ``repo_id`` with its small files (no weights yet), and its HubFiles."""
    files = HubFiles(repo_id, revision)
    config = files.get("config.json")
    assert config is not None
    if files.get(INDEX, required=False) is None:
        # an unsharded repo: its one weights file is what the weight map is read from
        files.get(SINGLE)
    for name in SMALL_FILES:
        files.get(name, required=False)
    return config.parent, files
