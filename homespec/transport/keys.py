"""CurveZMQ key pairs, and the keys this machine trusts (DESIGN §7).

Files, under ``config_dir()`` (``~/.config/homespec``, or ``$HOMESPEC_CONFIG``; a folder HomeSpec creates is made
0700, one it did not create is left as it is):
- ``head.key`` and ``worker.key``: this machine's key pair for each role, the z85 public key on the first line and
  the z85 secret key on the second; mode 0600, created on first use. A key file others can write is refused (with
  the chmod that fixes it); one others can read is used with a warning (its secret is no longer only yours);
- ``trusted_heads``: the heads this machine's worker serves, one per line as ``KEY name`` (``#`` starts a comment
  line); read again at every connection, so ``homespec keys trust`` needs no restart;
- ``trusted_workers``: the workers this machine's head deploys to (``homespec keys trust-worker``), same format. A
  key learned from a LAN advert or a worker's plain info port is only a claim: the head uses a worker only if its
  key is here, pinned on the command line (``HOST:PORT@KEY``) or in a profile the user saved.
A trust list others can write is refused: anyone who could edit it could let themselves in.

A key is 40 z85 characters (32 bytes). Only public keys are ever shown, printed or sent; a secret key never leaves
its file except into this process's sockets. ``fingerprint`` is a short form of a public key for people to compare
(``homespec worker`` prints its own; a head that meets an unknown worker prints the one it was shown).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import zmq
from zmq.utils import z85

from homespec.config import config_dir
from homespec.errors import ConfigError

log = logging.getLogger(__name__)

Role = Literal["head", "worker"]
TRUSTED = "trusted_heads"
TRUSTED_WORKERS = "trusted_workers"


@dataclass(frozen=True)
class KeyPair:
    public: str  # z85, 40 characters
    secret: str


def check_key(key: str) -> str:
    """A valid z85 public key, stripped; ConfigError otherwise."""
    key = key.strip()
    try:
        ok = len(key) == 40 and len(z85.decode(key.encode("ascii"))) == 32
    except (ValueError, UnicodeEncodeError, KeyError):
        ok = False
    if not ok:
        raise ConfigError(f"not a CurveZMQ public key: {key[:48]!r}", hint="a key is 40 z85 characters")
    return key


def fingerprint(key: str) -> str:
    """A public key's short form for people to compare: 16 hex digits of its SHA-256, in groups of four."""
    digest = hashlib.sha256(check_key(key).encode("ascii")).hexdigest()[:16]
    return "-".join(digest[i : i + 4] for i in range(0, 16, 4))


def _folder(folder: Path | None) -> Path:
    """The config folder; made 0700 if HomeSpec creates it (an existing folder's mode is the user's business)."""
    path = folder or config_dir()
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o700)
    return path


def _check_mode(path: Path, secret: bool) -> None:
    """Refuse a file that others can write; warn when a secret key is readable by others."""
    mode = path.stat().st_mode
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"{path} can be written by other users (mode {stat.S_IMODE(mode):o}): it is not used",
            hint=f"chmod 600 {path}",
        )
    if secret and mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("%s can be read by other users (mode %o): chmod 600 %s", path, stat.S_IMODE(mode), path)


def load_or_create(role: Role, folder: Path | None = None) -> KeyPair:
    """This machine's key pair for ``role``, made (mode 0600) the first time."""
    path = _folder(folder) / f"{role}.key"
    if not path.exists():
        public, secret = zmq.curve_keypair()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{public.decode()}\n{secret.decode()}\n")
    _check_mode(path, secret=True)
    lines = path.read_text().split()
    if len(lines) < 2:
        raise ConfigError(f"{path} is malformed", hint=f"remove it to make a new {role} key pair")
    pair = KeyPair(check_key(lines[0]), lines[1].strip())
    if zmq.curve_public(pair.secret.encode()).decode() != pair.public:
        raise ConfigError(f"{path}: the public key does not match the secret key", hint="remove the file")
    return pair


def trusted_heads(folder: Path | None = None) -> dict[str, str]:
    """Trusted head keys -> their names (empty names allowed)."""
    return _read_list(TRUSTED, folder)


def trusted_workers(folder: Path | None = None) -> dict[str, str]:
    """The workers this machine's head may deploy to: key -> name."""
    return _read_list(TRUSTED_WORKERS, folder)


def trust(key: str, name: str = "", folder: Path | None = None, list_name: str = TRUSTED) -> bool:
    """Add a key to a trust list (the heads this worker serves, or ``TRUSTED_WORKERS``); False if it was there."""
    key = check_key(key)
    known = _read_list(list_name, folder)
    if key in known:
        return False
    known[key] = name.replace("\n", " ").strip()
    _write_list(list_name, known, folder)
    return True


def untrust(key: str, folder: Path | None = None, list_name: str = TRUSTED) -> bool:
    known = _read_list(list_name, folder)
    if known.pop(check_key(key), None) is None:
        return False
    _write_list(list_name, known, folder)
    return True


def _read_list(list_name: str, folder: Path | None) -> dict[str, str]:
    path = (folder or config_dir()) / list_name
    if not path.is_file():
        return {}
    _check_mode(path, secret=False)
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):  # a comment line (z85 keys may hold '#', so only at the start)
            key, _, name = line.partition(" ")
            try:
                out[check_key(key)] = name.strip()
            except ConfigError:
                continue  # a broken line trusts nobody
    return out


_HEADERS = {TRUSTED: "heads this worker serves", TRUSTED_WORKERS: "workers this head deploys to"}


def _write_list(list_name: str, known: dict[str, str], folder: Path | None) -> None:
    path = _folder(folder) / list_name
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"# {_HEADERS[list_name]}: KEY name\n")
        f.writelines(f"{k} {n}\n" for k, n in known.items())
    os.replace(tmp, path)
