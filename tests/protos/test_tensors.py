"""protos/tensors.py: the wire format of tensors (little-endian, row-major) and its zero-copy decode."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from protos import expert_pb2
from protos.tensors import DTYPES, TensorFormatError, dtype_name, from_message, to_message

SHAPES = [(0, 8), (5,), (3, 4), (2, 3, 4), (2, 0, 3)]


def sample(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(-(2**31), 2**31 - 1, shape, generator=gen, dtype=dtype)  # every byte and the sign in use


@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_dtype_and_shape_round_trips(name: str, shape: tuple[int, ...]) -> None:
    t = sample(shape, DTYPES[name])

    m = to_message(t)
    back = from_message(m)

    assert m.dtype == name and list(m.shape) == list(shape)
    assert back.dtype == t.dtype and back.shape == t.shape
    assert torch.equal(back, t)


def test_bytes_are_little_endian_and_row_major() -> None:
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3) + 0.5

    assert to_message(t).data == np.asarray(t.numpy(), dtype="<f4").tobytes(order="C")
    assert to_message(t.T).data == np.ascontiguousarray(t.numpy().T, dtype="<f4").tobytes()  # strides do not leak
    assert to_message(torch.tensor([1.0], dtype=torch.bfloat16)).data == b"\x80\x3f"  # 0x3f80
    assert to_message(torch.tensor([1, -2], dtype=torch.int64)).data == (1).to_bytes(8, "little") + (-2).to_bytes(
        8, "little", signed=True)


def test_decode_borrows_the_message_bytes_instead_of_copying() -> None:
    m = to_message(torch.randn(16, 64))

    t = from_message(m)

    # torch.frombuffer storage wraps the caller's buffer: exactly its size, and not resizable because torch
    # did not allocate it. A copy (what bytearray(data) or torch.tensor(...) would give) is resizable.
    assert not t.untyped_storage().resizable()
    assert t.untyped_storage().nbytes() == len(m.data)
    assert t.clone().untyped_storage().resizable()


def test_decode_emits_no_warning_about_the_read_only_buffer() -> None:
    # torch warns once per process, so this runs in a fresh interpreter with warnings as errors.
    code = ("import torch; from protos.tensors import from_message, to_message; "
            "from_message(to_message(torch.ones(2, 3)))")

    done = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_tensor_is_encoded_from_host_memory() -> None:
    t = torch.randn(4, 8, device="cuda")

    assert torch.equal(from_message(to_message(t)), t.cpu())


@pytest.mark.parametrize(("message", "words"), [
    (expert_pb2.Tensor(dtype="float64", shape=[2], data=bytes(16)), ["'float64'", "[2]", "16 data bytes", "unknown dtype"]),
    (expert_pb2.Tensor(shape=[2], data=bytes(8)), ["''", "unknown dtype"]),
    (expert_pb2.Tensor(dtype="float32", shape=[2, 3], data=bytes(20)), ["'float32'", "[2, 3]", "20 data bytes", "24 bytes"]),
    (expert_pb2.Tensor(dtype="int64", shape=[2], data=bytes(17)), ["'int64'", "17 data bytes", "16 bytes"]),
    (expert_pb2.Tensor(dtype="bfloat16", shape=[0, 4], data=b"\x00"), ["[0, 4]", "1 data bytes", "0 bytes"]),
    (expert_pb2.Tensor(dtype="float32", shape=[-1, 2], data=bytes(8)), ["[-1, 2]", "negative dimension"]),
], ids=["unknown dtype", "no dtype", "truncated", "one byte too many", "bytes for an empty batch", "negative dim"])
def test_a_malformed_message_raises_naming_the_problem(message: expert_pb2.Tensor, words: list[str]) -> None:
    with pytest.raises(TensorFormatError) as caught:
        from_message(message)

    assert isinstance(caught.value, ValueError)
    for word in words:
        assert word in str(caught.value)


def test_an_unsupported_dtype_cannot_be_encoded() -> None:
    with pytest.raises(TensorFormatError, match=r"torch\.float64"):
        to_message(torch.zeros(2, dtype=torch.float64))


def test_dtype_names_match_the_table() -> None:
    assert {dtype_name(dtype): dtype for dtype in DTYPES.values()} == DTYPES
