"""Message <-> ZeroMQ multipart frames: a msgpack header, then one raw frame per tensor (DESIGN §7).

Header: ``{"v": PROTOCOL_VERSION, "type": kind, "fields": {...}, "tensors": [{"dtype": name, "shape": [...]}]}``.
``decode`` checks the version, the kind (through ``REGISTRY``), every field's type, the tensor count against the
frames, each frame's size against its declared dtype and shape, and the total against a cap — before any data is
used. Anything wrong raises ``TransportError``; nothing is ever unpickled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack  # type: ignore[import-untyped]

from homespec.core.messages import (
    PROTOCOL_VERSION,
    REGISTRY,
    Message,
    RawTensor,
    check_tensor_spec,
    from_fields,
    header_fields,
    nbytes,
)
from homespec.errors import TransportError

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
MAX_HEADER_BYTES = 4 * 1024 * 1024

Frame = bytes | memoryview


def encode(msg: Message) -> list[Frame]:
    tensors = msg.tensors()
    header = {
        "v": PROTOCOL_VERSION,
        "type": msg.kind,
        "fields": header_fields(msg),
        "tensors": [{"dtype": t.dtype, "shape": list(t.shape)} for t in tensors],
    }
    return [msgpack.packb(header, use_bin_type=True), *(t.data for t in tensors)]


def decode(frames: Sequence[Any], max_bytes: int = DEFAULT_MAX_BYTES) -> Message:
    """Frames (bytes, memoryview or zmq.Frame) -> a validated Message, or TransportError."""
    if not frames:
        raise TransportError("empty message")
    raw = [_buffer(f) for f in frames]
    if len(raw[0]) > MAX_HEADER_BYTES:
        raise TransportError(f"header of {len(raw[0])} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(bytes(raw[0]), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several types for garbage
        raise TransportError(f"header is not msgpack: {type(exc).__name__}") from exc
    if not isinstance(header, dict) or set(header) != {"v", "type", "fields", "tensors"}:
        raise TransportError("header must be a map with v, type, fields, tensors")
    if header["v"] != PROTOCOL_VERSION:
        raise TransportError(f"protocol version {header['v']!r}, expected {PROTOCOL_VERSION}")
    cls = REGISTRY.get(header["type"]) if isinstance(header["type"], str) else None
    if cls is None:
        raise TransportError(f"unknown message type {header['type']!r}")
    specs = header["tensors"]
    if not isinstance(specs, list) or not isinstance(header["fields"], dict):
        raise TransportError("tensors must be a list and fields a map")
    if len(specs) != len(raw) - 1:
        raise TransportError(f"{cls.kind}: header declares {len(specs)} tensors, message has {len(raw) - 1} frames")
    tensors = _tensors(specs, raw[1:], max_bytes)
    try:
        return from_fields(cls, header["fields"], tensors)
    except (ValueError, TypeError) as exc:
        raise TransportError(str(exc)) from exc


def pack_frames(frames: Sequence[Frame]) -> bytes:
    """Frames as one byte string, for a plain stream (a worker's info port): each frame as a 4-byte big-endian
    length and its bytes."""
    return b"".join(len(f).to_bytes(4, "big") + bytes(f) for f in frames)


def unpack_frames(data: bytes, max_frames: int = 64) -> list[bytes]:
    """The frames of ``pack_frames``; TransportError if the lengths do not add up."""
    frames: list[bytes] = []
    at = 0
    while at < len(data):
        if len(frames) >= max_frames or at + 4 > len(data):
            raise TransportError("a packed message with a cut length or too many frames")
        n = int.from_bytes(data[at : at + 4], "big")
        if at + 4 + n > len(data):
            raise TransportError(f"a packed frame of {n} bytes runs past the {len(data)} received")
        frames.append(data[at + 4 : at + 4 + n])
        at += 4 + n
    return frames


def _tensors(specs: list[Any], frames: list[memoryview], max_bytes: int) -> list[RawTensor]:
    total = 0
    out = []
    for spec, frame in zip(specs, frames, strict=True):
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape"} or not isinstance(spec["shape"], list):
            raise TransportError("a tensor spec must be {dtype, shape}")
        shape = tuple(spec["shape"])
        try:
            check_tensor_spec(spec["dtype"], shape)
        except ValueError as exc:
            raise TransportError(str(exc)) from exc
        size = nbytes(spec["dtype"], shape)
        total += size
        if total > max_bytes:
            raise TransportError(f"tensors of {total} bytes exceed the cap of {max_bytes}")
        if len(frame) != size:
            raise TransportError(f"tensor {spec['dtype']}{list(shape)} needs {size} bytes, frame has {len(frame)}")
        out.append(RawTensor(spec["dtype"], shape, frame))
    return out


def _buffer(frame: Any) -> memoryview:
    if isinstance(frame, bytes | bytearray):
        return memoryview(frame)
    if isinstance(frame, memoryview):
        return frame.cast("B") if frame.format != "B" or frame.ndim != 1 else frame
    buffer = getattr(frame, "buffer", None)  # zmq.Frame
    if buffer is not None:
        return memoryview(buffer).cast("B")
    raise TransportError(f"frame of type {type(frame).__name__}")
