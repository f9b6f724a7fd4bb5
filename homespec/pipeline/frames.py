"""torch tensors <-> ``RawTensor`` (dtype by name, shape, bytes). ``to_raw`` shares a contiguous CPU tensor's memory
(no copy; others are made contiguous on the CPU first); ``from_raw`` copies the frame's bytes once, since a
received frame is read-only and a tensor over it could not be written."""

from __future__ import annotations

import torch

from homespec.core.messages import RawTensor

_BY_NAME = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in _BY_NAME.items()}


def to_raw(t: torch.Tensor) -> RawTensor:
    t = t.detach().to("cpu").contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b""
    return RawTensor(_NAMES[t.dtype], tuple(t.shape), data)


def from_raw(raw: RawTensor, device: str = "cpu") -> torch.Tensor:
    dtype = _BY_NAME[raw.dtype]
    if len(raw.data) == 0:
        return torch.empty(raw.shape, dtype=dtype, device=device)
    flat = torch.frombuffer(bytearray(raw.data), dtype=torch.uint8)
    return flat.view(dtype).reshape(raw.shape).to(device)
