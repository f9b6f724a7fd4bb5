"""A GGUF file's tensor index, read straight from its header (the layout of llama.cpp's ``docs/gguf.md``).

``gguf.GGUFReader`` builds a numpy view for every part of every metadata value: on the bundled SmolLM2 file (its
tokenizer's 49 152 tokens and 48 900 merges) it took 5.0 s of CPU before the first tensor could be read, paid by
every stage process and engine that opens the file. A stage needs none of that metadata but the architecture name
and the alignment, so this reader walks the key-value section without keeping it (about 0.1 s) and memory-maps the
tensors. Each tensor's ``data`` is what ``GGUFReader`` gives (``quant.from_gguf`` reads either): for F16/F32/F64/I8
to I64 an array of that dtype in numpy's dimension order, for a block-quantized type uint8 rows of its bytes.

Only little-endian files of versions 2 and 3 are read; anything truncated or inconsistent (a string running past
the end, an unknown value or tensor type, a tensor whose bytes lie outside the file, a duplicated name) raises a
``ModelError`` naming the file and what is wrong."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from homespec.errors import ModelError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# value types: (struct format, size) of the scalars; 8 is a string, 9 an array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_PLAIN = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
          "I32": np.int32, "I64": np.int64}  # fmt: skip


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    dims: tuple[int, ...]  # GGML's order: innermost first
    data: np.ndarray[Any, Any]


class _Cursor:
    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str) -> ModelError:
        return ModelError(f"cannot read GGUF {self.path}: {what} (at byte {self.pos} of {len(self.buf)})")

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise self.fail("the file ends inside its header")
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> bytes:
        n = self.unpack("Q")
        if self.pos + n > len(self.buf):
            raise self.fail(f"a string of {n} bytes runs past the end of the file")
        out = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return out

    def skip_strings(self, count: int) -> None:
        buf, pos, end = self.buf, self.pos, len(self.buf)
        for _ in range(count):
            if pos + 8 > end:
                raise self.fail("the file ends inside a string array")
            pos += 8 + int.from_bytes(buf[pos : pos + 8], "little")
        if pos > end:
            raise self.fail("a string array runs past the end of the file")
        self.pos = pos

    def value(self, vtype: int) -> Any:
        """One metadata value of type ``vtype``: a scalar, bytes for a string, None for an array (walked over)."""
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise self.fail(f"unknown metadata value type {vtype}")
        etype, count = self.unpack("I"), self.unpack("Q")
        if etype == _STRING:
            self.skip_strings(count)
        elif etype in _SCALARS:
            size = struct.calcsize("<" + _SCALARS[etype])
            if self.pos + size * count > len(self.buf):
                raise self.fail("an array runs past the end of the file")
            self.pos += size * count
        else:
            for _ in range(count):  # arrays of arrays: walked element by element
                self.value(etype)
        return None


def read_index(path: Path) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
    """(the file's scalar and string metadata, its tensors by GGUF name), the tensors memory-mapped."""
    import gguf

    try:
        mm = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read GGUF {path}: {exc}") from exc
    cur = _Cursor(memoryview(mm), path)  # type: ignore[arg-type]
    if bytes(cur.buf[:4]) != MAGIC:
        raise ModelError(f"cannot read GGUF {path}: not a GGUF file (no GGUF magic)")
    cur.pos = 4
    version = cur.unpack("I")
    if version not in (2, 3):
        raise cur.fail(f"GGUF version {version} (a big-endian file, or one this reader does not know; 2 and 3 are)")
    n_tensors, n_kv = cur.unpack("Q"), cur.unpack("Q")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string().decode("utf-8", "replace")
        value = cur.value(cur.unpack("I"))
        if value is not None:
            meta[key] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    infos = []
    for _ in range(n_tensors):
        name = cur.string().decode("utf-8", "replace")
        n_dims = cur.unpack("I")
        if not 1 <= n_dims <= 4:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions")
        dims = tuple(cur.unpack("Q") for _ in range(n_dims))
        infos.append((name, dims, cur.unpack("I"), cur.unpack("Q")))
    alignment = int(meta.get("general.alignment", DEFAULT_ALIGNMENT))
    if alignment <= 0 or alignment & (alignment - 1):
        raise cur.fail(f"alignment {alignment} is not a power of two")
    start = -(-cur.pos // alignment) * alignment
    tensors: dict[str, GGUFTensor] = {}
    for name, dims, raw_type, offset in infos:
        if name in tensors:
            raise cur.fail(f"tensor {name!r} appears twice")
        try:
            ttype = gguf.GGMLQuantizationType(raw_type)
            block, type_size = gguf.GGML_QUANT_SIZES[ttype]
        except (ValueError, KeyError) as exc:
            raise cur.fail(f"tensor {name!r} has an unknown type {raw_type}") from exc
        count = int(np.prod(dims))
        if dims[0] % block:
            raise cur.fail(f"tensor {name!r}: {dims[0]} values per row is not a multiple of {ttype.name}'s {block}")
        nbytes = count // block * type_size
        at = start + offset
        if at + nbytes > len(mm):
            raise cur.fail(f"tensor {name!r}'s {nbytes} bytes at {at} lie past the end of the file")
        shape = tuple(reversed(dims))
        if ttype.name in _PLAIN:
            data = mm[at : at + nbytes].view(_PLAIN[ttype.name]).reshape(shape)
        else:
            data = mm[at : at + nbytes].reshape(*shape[:-1], dims[0] // block * type_size)
        tensors[name] = GGUFTensor(name, ttype, dims, data)
    return meta, tensors
