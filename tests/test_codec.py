"""Wire codec: round trips for every message and dtype, and rejection of every kind of malformed input."""

from __future__ import annotations

import contextlib
import math
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from homespec.core.messages import (
    DTYPE_SIZES,
    REGISTRY,
    Abort,
    Assign,
    Heartbeat,
    Prune,
    RawTensor,
    Result,
    Wave,
    nbytes,
)
from homespec.errors import TransportError
from homespec.transport.codec import decode, encode


def raw(dtype: str, shape: tuple[int, ...], fill: int = 7) -> RawTensor:
    return RawTensor(dtype, shape, bytes([fill]) * (DTYPE_SIZES[dtype] * math.prod(shape)))


SAMPLES = [
    Assign(0, 2, "/models/x", 0, 15, "float32", "cpu", 4096, 256, 12.5, 0.4, 0.3, 0.14),
    Wave(9, False, (3,), (2,), (1,), (5, 6), (-1, 5), (40, 41), raw("float32", (2, 576))),
    Wave(9, False, (3, 4, 8), (1, 0, 2), (1, 0, 5), (5, 2, 3), (-1, -1, 2), (40, 7, 8), raw("int64", (3,))),
    Wave(-1, True, (3,), (0,), (0,), (), (), (), raw("int64", (0,))),
    Prune(3, 9, 1, (5, 6), (7, 8, 9)),
    Result(3, 9, (5,), (11,), raw("int64", (1, 4)), raw("float32", (1, 4)), raw("float32", (1, 8))),
    Abort(3, "client went away"),
    Heartbeat(1, 2**40),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.kind)
def test_round_trip(msg: object) -> None:
    frames = encode(msg)  # type: ignore[arg-type]
    back = decode(frames)
    assert type(back) is type(msg)
    assert _norm(back) == _norm(msg)


def _norm(msg: object) -> dict[str, object]:
    return {k: (bytes(v.data), v.dtype, v.shape) if isinstance(v, RawTensor) else v for k, v in vars(msg).items()}


@given(st.sampled_from(sorted(DTYPE_SIZES)), st.lists(st.integers(0, 5), min_size=0, max_size=4))
@settings(max_examples=100)
def test_every_dtype_and_shape_round_trips(dtype: str, dims: list[int]) -> None:
    shape = (0, *dims)
    msg = Wave(2, False, (1,), (0,), (0,), (), (), (), raw(dtype, shape, fill=3))
    back = decode(encode(msg))
    assert isinstance(back, Wave) and back.data.dtype == dtype and back.data.shape == shape
    assert bytes(back.data.data) == bytes(msg.data.data)


@given(st.sampled_from(sorted(DTYPE_SIZES)), st.lists(st.integers(1, 6), min_size=0, max_size=3), st.data())
@settings(max_examples=150, deadline=None)
def test_every_dtype_round_trips_with_its_data(dtype: str, dims: list[int], data: st.DataObject) -> None:
    """Tensors with data of every dtype (0-d included), the bytes random: the same dtype, shape and bytes back, and
    through torch the same values (bf16 and fp16 bit for bit, NaNs included)."""
    import torch

    from homespec.pipeline.frames import from_raw

    shape = tuple(dims)
    payload = data.draw(st.binary(min_size=nbytes(dtype, shape), max_size=nbytes(dtype, shape)))
    if dtype == "bool":
        payload = bytes(b & 1 for b in payload)  # torch's bool is one byte of 0 or 1
    msg = Result(1, 2, (), (), raw("int64", (0, 4)), raw("float32", (0, 4)), RawTensor(dtype, shape, payload))
    back = decode(encode(msg))
    assert isinstance(back, Result)
    assert (back.hidden.dtype, back.hidden.shape, bytes(back.hidden.data)) == (dtype, shape, payload)
    tensor = from_raw(back.hidden)
    assert tuple(tensor.shape) == shape and str(tensor.dtype) == f"torch.{dtype}"
    assert tensor.reshape(-1).view(torch.uint8).tolist() == list(payload)


def test_zero_dim_tensor_round_trips() -> None:
    msg = Result(
        1, 2, (), (), raw("int64", (0, 4)), raw("float32", (0, 4)), RawTensor("float32", (), struct.pack("<f", 1.5))
    )
    assert struct.unpack("<f", bytes(decode(encode(msg)).hidden.data))[0] == 1.5  # type: ignore[attr-defined]


def header(**over: object) -> bytes:
    fields = {"request": 1, "step": 2, "seq": 1, "committed": [1], "dead": []}
    h = {"v": 1, "type": "prune", "fields": fields, "tensors": []}
    h.update(over)
    return msgpack.packb(h)


@pytest.mark.parametrize(
    ("frames", "why"),
    [
        ([], "empty"),
        ([b"\xc1garbage"], "not msgpack"),
        ([msgpack.packb([1, 2])], "must be a map"),
        ([header(v=99)], "protocol version"),
        ([header(type="pickle")], "unknown message type"),
        ([header(fields={"request": "1", "step": 2, "seq": 1, "committed": [], "dead": []})], "expected int"),
        ([header(fields={"request": True, "step": 2, "seq": 1, "committed": [], "dead": []})], "expected int"),
        ([header(fields={"request": 1, "step": 2, "seq": 1, "committed": [], "dead": [], "x": 1})], "unknown fields"),
        ([header(fields={"request": 1, "step": 2, "seq": 1, "committed": []})], "missing field"),
        ([header(fields={"request": 1, "step": 2, "seq": 1, "committed": 5, "dead": []})], "expected a list"),
        ([header(), b"extra"], "declares 0 tensors"),
    ],
)
def test_malformed_headers_are_rejected(frames: list[bytes], why: str) -> None:
    with pytest.raises(TransportError, match=why):
        decode(frames)


def wave_frames(spec: dict[str, object], data: bytes) -> list[bytes]:
    fields = {
        "step": 1,
        "prefix": False,
        "requests": [1],
        "counts": [0],
        "prune_seqs": [0],
        "nodes": [],
        "parents": [],
        "positions": [],
    }
    carry = {"dtype": "float32", "shape": [0]}  # no EAGLE-3 sum (Wave.carry)
    return [msgpack.packb({"v": 1, "type": "wave", "fields": fields, "tensors": [spec, carry]}), data, b""]


@pytest.mark.parametrize(
    ("spec", "data", "why"),
    [
        ({"dtype": "float32", "shape": [2, 2]}, b"\0" * 15, "needs 16 bytes"),
        ({"dtype": "float128", "shape": [1]}, b"\0" * 16, "unknown dtype"),
        ({"dtype": "float32", "shape": [-1]}, b"", "bad shape"),
        ({"dtype": "float32", "shape": ["2"]}, b"", "bad shape"),
        ({"dtype": "float32", "shape": [1 << 20, 1 << 10]}, b"", "exceed the cap"),
        ({"dtype": "float32"}, b"", "dtype, shape"),
    ],
)
def test_bad_tensor_frames_are_rejected(spec: dict[str, object], data: bytes, why: str) -> None:
    with pytest.raises(TransportError, match=why):
        decode(wave_frames(spec, data), max_bytes=1 << 30 if "cap" not in why else 1 << 20)


@pytest.mark.parametrize(
    ("over", "shape", "why"),
    [
        ({"counts": [1, 1]}, [0], "differ in length"),
        ({"counts": [-1]}, [0], "negative count"),
        ({"requests": [1, 1], "counts": [0, 0], "prune_seqs": [0, 0]}, [0], "repeated request"),
        ({"counts": [2]}, [0], "2 rows"),
        ({"counts": [1], "positions": [4], "nodes": [1], "parents": [-1]}, [0], "data \\[0\\] for 1 rows"),
        ({"counts": [1], "positions": [4], "nodes": [1]}, [1], "1 nodes and 0 parents"),
        ({"prefix": True, "requests": [1, 2], "counts": [0, 0], "prune_seqs": [0, 0]}, [0], "one request"),
    ],
)
def test_inconsistent_waves_are_rejected(over: dict[str, object], shape: list[int], why: str) -> None:
    """A wave's segments must add up: a stage never indexes rows that a header promises but the data lacks."""
    frames = wave_frames({"dtype": "int64", "shape": shape}, b"\0" * (8 * (shape[0] if shape else 1)))
    header = msgpack.unpackb(frames[0])
    header["fields"].update(over)
    with pytest.raises(TransportError, match=why):
        decode([msgpack.packb(header), *frames[1:]])


@given(st.lists(st.binary(max_size=64), min_size=1, max_size=4))
@settings(max_examples=300)
def test_random_bytes_never_escape_as_other_errors(frames: list[bytes]) -> None:
    with contextlib.suppress(TransportError):
        decode(frames)


def test_registry_covers_every_kind() -> None:
    assert set(REGISTRY) >= {"assign", "wave", "prune", "result", "abort", "heartbeat", "stats", "shutdown"}
