"""CurveZMQ key pairs and the list of trusted heads (DESIGN §7).

Files, under ``config_dir()`` (``~/.config/homespec``, or ``$HOMESPEC_CONFIG``; the folder mode 0700):
- ``head.key`` and ``worker.key``: this machine's key pair for each role, the z85 public key on the first line and
  the z85 secret key on the second; mode 0600, created on first use;
- ``trusted_heads``: the public keys of the heads this machine's worker serves, one per line as ``KEY name``
  (a line that starts with ``#`` is a comment); read again at every connection, so ``homespec keys trust`` needs
  no restart.

A key is 40 z85 characters (32 bytes). Only public keys are ever shown, printed or sent; a secret key never leaves
its file except into this process's sockets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import zmq
from zmq.utils import z85

from homespec.config import config_dir
from homespec.errors import ConfigError

Role = Literal["head", "worker"]
TRUSTED = "trusted_heads"


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


def _folder(folder: Path | None) -> Path:
    path = folder or config_dir()
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def load_or_create(role: Role, folder: Path | None = None) -> KeyPair:
    """This machine's key pair for ``role``, made (mode 0600) the first time."""
    path = _folder(folder) / f"{role}.key"
    if not path.exists():
        public, secret = zmq.curve_keypair()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{public.decode()}\n{secret.decode()}\n")
    lines = path.read_text().split()
    if len(lines) < 2:
        raise ConfigError(f"{path} is malformed", hint=f"remove it to make a new {role} key pair")
    pair = KeyPair(check_key(lines[0]), lines[1].strip())
    if zmq.curve_public(pair.secret.encode()).decode() != pair.public:
        raise ConfigError(f"{path}: the public key does not match the secret key", hint="remove the file")
    return pair


def trusted_heads(folder: Path | None = None) -> dict[str, str]:
    """Trusted head keys -> their names (empty names allowed)."""
    path = (folder or config_dir()) / TRUSTED
    if not path.is_file():
        return {}
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


def trust(key: str, name: str = "", folder: Path | None = None) -> bool:
    """Add a head's key to the trusted list; False if it was there already."""
    key = check_key(key)
    known = trusted_heads(folder)
    if key in known:
        return False
    known[key] = name.replace("\n", " ").strip()
    _write_trusted(known, folder)
    return True


def untrust(key: str, folder: Path | None = None) -> bool:
    known = trusted_heads(folder)
    if known.pop(check_key(key), None) is None:
        return False
    _write_trusted(known, folder)
    return True


def _write_trusted(known: dict[str, str], folder: Path | None) -> None:
    path = _folder(folder) / TRUSTED
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# heads this worker serves: KEY name\n")
        f.writelines(f"{k} {n}\n" for k, n in known.items())
    os.replace(tmp, path)
