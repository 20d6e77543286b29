"""The one tensor codec: torch.Tensor <-> tandem.v1.Tensor, used on both ends of every wire.

A tensor travels as a dtype name, a shape and its raw little-endian bytes, taken through a
uint8 view, so bfloat16 needs no special case and numpy is never involved. `decode` trusts
nothing: it checks dtype, shape, size limits and byte count before touching the payload.

Decoded tensors share memory with the payload bytes (no copy beyond the one the protobuf
accessor makes) and must be treated as read-only: `.clone()` before writing in place.
"""

from __future__ import annotations

import ctypes
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tandem.core.errors import CodecError
from tandem.v1 import tensor_pb2

if sys.byteorder != "little":
    raise ImportError(
        "tandem.core.wire.codec needs a little-endian host: the wire format is little-endian "
        f"and tensors are sent as raw memory, but this host is {sys.byteorder}-endian"
    )

# Wire name -> torch dtype. The wire name is torch's own name without the "torch." prefix.
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float32", "float16", "bfloat16", "float64",
        "int64", "int32", "int16", "int8", "uint8", "bool",
    )
}
_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

# Payloads smaller than this are copied: cheap, and it keeps CPython's shared one-byte
# bytes objects out of reach of a tensor that is (wrongly) written in place.
_MIN_ZERO_COPY_BYTES = 1024

# torch.frombuffer warns, once per process, that a tensor over immutable `bytes` is writable.
# Decoded tensors are read-only by contract, so spend that one warning here, silenced. (A
# module-level warnings filter would not do: an enclosing catch_warnings, as pytest uses
# around imports, drops it. catch_warnings on each decode is not thread-safe.)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    torch.frombuffer(bytes(1), dtype=torch.uint8)


@dataclass(frozen=True)
class CodecLimits:
    """Bounds a decoded tensor must stay within; checked before anything is allocated."""

    max_rank: int = 8
    """Most dimensions a tensor may have."""
    max_numel: int = 2**31 - 1
    """Most elements a tensor may have."""
    max_bytes: int = 2**31 - 1
    """Most payload bytes a tensor may have (protobuf caps a bytes field at 2 GiB)."""


DEFAULT_LIMITS = CodecLimits()


def encode(tensor: torch.Tensor) -> tensor_pb2.Tensor:
    """Encode a dense tensor of a whitelisted dtype, from any device, contiguous or not."""
    name = _NAMES.get(tensor.dtype)
    if name is None:
        raise CodecError(f"cannot encode dtype {tensor.dtype}; allowed: {', '.join(DTYPES)}")
    if tensor.layout != torch.strided:
        raise CodecError(f"cannot encode a {tensor.layout} tensor; only dense tensors")
    return tensor_pb2.Tensor(dtype=name, shape=list(tensor.shape), data=raw(tensor))


def decode(
    message: tensor_pb2.Tensor,
    *,
    expected_dtype: torch.dtype | str | None = None,
    expected_shape: Sequence[int] | None = None,
    limits: CodecLimits = DEFAULT_LIMITS,
) -> torch.Tensor:
    """Check a Tensor message and return a CPU tensor over its bytes (read-only, see above).

    Raises CodecError naming the problem: unknown dtype, negative dim, rank or size over
    `limits`, byte count not numel * itemsize, or a mismatch with expected_dtype/shape.
    """
    dtype = DTYPES.get(message.dtype)
    if dtype is None:
        shown = message.dtype[:32] + ("..." if len(message.dtype) > 32 else "")  # untrusted
        raise CodecError(f"unknown dtype {shown!r}; allowed: {', '.join(DTYPES)}")
    if expected_dtype is not None:
        expected_name = (
            expected_dtype if isinstance(expected_dtype, str)
            else _NAMES.get(expected_dtype, str(expected_dtype))
        )
        if message.dtype != expected_name:
            raise CodecError(f"dtype is {message.dtype}, expected {expected_name}")
    shape = tuple(message.shape)
    numel = _checked_numel(shape, limits)
    if expected_shape is not None and shape != tuple(expected_shape):
        raise CodecError(f"shape is {list(shape)}, expected {list(expected_shape)}")

    return _over_bytes(message.data, dtype, shape, numel, limits, what=f"shape {list(shape)} of {message.dtype}")


def layout(dtype: torch.dtype, row_shape: Sequence[int]) -> tensor_pb2.TensorLayout:
    """The layout a structure-aware stream announces once: dtype and the dims after the rows."""
    name = _NAMES.get(dtype)
    if name is None:
        raise CodecError(f"cannot encode dtype {dtype}; allowed: {', '.join(DTYPES)}")
    return tensor_pb2.TensorLayout(dtype=name, row_shape=list(row_shape))


def raw(tensor: torch.Tensor) -> bytes:
    """The tensor's elements as raw little-endian bytes, for a frame of a structure-aware stream."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)  # [nbytes]
    # One copy, from tensor memory straight into the bytes object.
    return ctypes.string_at(flat.data_ptr(), flat.numel()) if flat.numel() else b""


def check_layout(message: tensor_pb2.TensorLayout, expected_dtype: torch.dtype,
                 expected_row_shape: Sequence[int]) -> tensor_pb2.TensorLayout:
    """Check a stream's announced layout against what the receiver computes with."""
    expected_name = _NAMES.get(expected_dtype, str(expected_dtype))
    if message.dtype != expected_name:
        shown = message.dtype[:32]  # untrusted
        raise CodecError(f"stream layout dtype is {shown!r}, expected {expected_name}")
    if tuple(message.row_shape) != tuple(expected_row_shape):
        raise CodecError(f"stream layout row shape is {list(message.row_shape)[:8]}, expected {list(expected_row_shape)}")
    return message


def decode_rows(data: bytes | memoryview, layout: tensor_pb2.TensorLayout, rows: int,
                limits: CodecLimits = DEFAULT_LIMITS) -> torch.Tensor:
    """A [rows, *layout.row_shape] tensor over the raw bytes of a structure-aware frame, the row
    count taken from the receiver's step plan. Read-only, like `decode`'s tensors."""
    dtype = DTYPES.get(layout.dtype)
    if dtype is None:
        raise CodecError(f"unknown dtype {layout.dtype[:32]!r}; allowed: {', '.join(DTYPES)}")
    shape = (rows, *layout.row_shape)
    numel = _checked_numel(shape, limits)
    return _over_bytes(data, dtype, shape, numel, limits, what=f"the plan's {rows} rows of {list(layout.row_shape)} {layout.dtype}")


def _over_bytes(data, dtype: torch.dtype, shape: tuple[int, ...], numel: int, limits: CodecLimits,
                what: str) -> torch.Tensor:
    """A tensor of `shape` over `data`, after checking the byte count against it."""
    nbytes = numel * dtype.itemsize
    if nbytes > limits.max_bytes:
        raise CodecError(f"{what} needs {nbytes} bytes, over the limit of {limits.max_bytes}")
    if len(data) != nbytes:
        raise CodecError(f"payload has {len(data)} bytes, but {what} needs {numel} * {dtype.itemsize} = {nbytes} bytes")
    if numel == 0:  # torch.frombuffer rejects an empty buffer
        return torch.empty(shape, dtype=dtype)
    buffer = data if len(data) >= _MIN_ZERO_COPY_BYTES else bytearray(data)
    raw_bytes = torch.frombuffer(buffer, dtype=torch.uint8)  # [nbytes], shares memory with buffer
    if dtype == torch.bool and bool((raw_bytes > 1).any()):
        raise CodecError("bool payload holds bytes other than 0 and 1")
    return raw_bytes.view(dtype).view(shape)  # [*shape]


def _checked_numel(shape: tuple[int, ...], limits: CodecLimits) -> int:
    """Element count of `shape`, rejecting bad dims and stopping before it can blow up."""
    if len(shape) > limits.max_rank:
        raise CodecError(f"rank {len(shape)} is over the limit of {limits.max_rank}")
    for axis, dim in enumerate(shape):
        if dim < 0:
            raise CodecError(f"shape {list(shape)} has negative dim {dim} at axis {axis}")
        if dim > limits.max_numel:
            raise CodecError(
                f"shape {list(shape)} has dim {dim} at axis {axis}, over the element limit "
                f"of {limits.max_numel}"
            )
    span = 1  # the product of the dims, a 0 counted as 1: torch's strides reach it even when empty
    for dim in shape:  # every factor and partial product stays <= max_numel: no overflow
        if max(dim, 1) > limits.max_numel // span:
            raise CodecError(
                f"shape {list(shape)} has more than {limits.max_numel} elements (the limit; a dim of 0 counts as 1)"
            )
        span *= max(dim, 1)
    return 0 if 0 in shape else span
