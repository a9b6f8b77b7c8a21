"""The one converter between the `Tensor` message and `torch.Tensor`.

A message holds raw little-endian bytes in row-major order, a dtype name and a shape. Encoding
copies once (the bytes field must own its data); decoding wraps the received bytes without a copy.
"""

from __future__ import annotations

import math
import sys
import warnings

import torch

from protos import expert_pb2

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int32": torch.int32,
    "int64": torch.int64,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class TensorFormatError(ValueError):
    """A Tensor message (or a tensor to encode) with an unsupported dtype or a size that does not add up."""


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16": the wire name of a supported dtype."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise TensorFormatError(f"dtype {dtype} is not supported on the wire: use one of {list(DTYPES)}") from None


def to_message(t: torch.Tensor) -> expert_pb2.Tensor:
    """Any supported tensor (any device, any strides) -> a Tensor message of its row-major bytes."""
    _require_little_endian()
    name = dtype_name(t.dtype)
    flat = t.detach().to("cpu").contiguous().reshape(-1)  # [N]
    data = flat.view(torch.uint8).numpy().tobytes()  # via uint8: numpy has no bfloat16
    return expert_pb2.Tensor(dtype=name, shape=list(t.shape), data=data)


def from_message(m: expert_pb2.Tensor) -> torch.Tensor:
    """A Tensor message -> a CPU tensor reading the message's bytes in place (read-only by contract).

    Raises TensorFormatError naming dtype, shape and byte count when the message is malformed.
    """
    _require_little_endian()
    data = m.data  # protobuf builds a new bytes object on every access: read it once
    shape = tuple(m.shape)
    dtype = _checked_dtype(m.dtype, shape, len(data))
    if not data:  # torch.frombuffer rejects empty buffers
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        # bytes are immutable, so torch warns that the tensor could write to them. Nothing here writes
        # to a decoded tensor (the alternative, bytearray(data), is the copy this module avoids).
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        flat = torch.frombuffer(data, dtype=dtype)  # [N], shares memory with `data`
    return flat.reshape(shape)


def _checked_dtype(name: str, shape: tuple[int, ...], num_bytes: int) -> torch.dtype:
    """The dtype named by a message, once its shape and byte count are known to agree with it."""
    def malformed(problem: str) -> TensorFormatError:
        return TensorFormatError(f"malformed tensor (dtype {name!r}, shape {list(shape)}, {num_bytes} data bytes): "
                                 f"{problem}")

    dtype = DTYPES.get(name)
    if dtype is None:
        raise malformed(f"unknown dtype, expected one of {list(DTYPES)}")
    if any(dim < 0 for dim in shape):
        raise malformed("negative dimension")
    expected = math.prod(shape) * dtype.itemsize
    if num_bytes != expected:
        raise malformed(f"expected prod(shape) * {dtype.itemsize} = {expected} bytes")
    return dtype


def _require_little_endian() -> None:
    # The wire format is little-endian and torch reads the host's byte order; no supported platform
    # (x86-64, aarch64) is big-endian, so fail loudly rather than byte-swap.
    if sys.byteorder != "little":
        raise RuntimeError("protos.tensors supports little-endian hosts only")
