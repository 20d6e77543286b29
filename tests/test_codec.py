"""The tensor codec: bit-exact round trips for every dtype, zero-copy decode, strict checks."""

import ctypes
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from tandem.core.errors import CodecError
from tandem.core.wire.codec import DTYPES, CodecLimits, decode, decode_rows, encode
from tandem.v1 import tensor_pb2

# Same-size integer dtype, to compare float payloads bit for bit (NaN != NaN otherwise).
BITS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random values of `dtype`; floats include inf, -inf, NaN and -0.0 where there is room."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        t = (torch.randn(shape, generator=gen, dtype=torch.float64) * 1e3).to(dtype)
        flat = t.view(-1)
        specials = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0], dtype=dtype)
        n = min(len(specials), flat.numel())
        flat[:n] = specials[:n]
        return t
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64).to(dtype)


def assert_identical(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    bits = BITS.get(a.dtype)
    if bits is None:
        assert torch.equal(a, b)
    else:
        assert torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))


def buffer_address(data: bytes) -> int:
    """Address of the first byte inside a bytes object (ctypes points at it, no copy)."""
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value


def message(dtype: str, shape: list[int], data: bytes) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)


# --- round trips -----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (1, 1, 1, 300)])
def test_round_trip_every_dtype(name: str, shape: tuple[int, ...]) -> None:
    t = sample(DTYPES[name], shape)
    msg = encode(t)
    assert msg.dtype == name and list(msg.shape) == list(shape)
    assert len(msg.data) == t.numel() * t.element_size()
    assert_identical(decode(msg), t)


def test_bfloat16_bits_survive() -> None:
    # Every one of the 65,536 bfloat16 bit patterns, NaN payloads and subnormals included.
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)  # [65536]
    t = bits.view(torch.bfloat16)
    out = decode(encode(t))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.view(torch.int16), bits)


def test_wire_bytes_are_little_endian() -> None:
    msg = encode(torch.tensor([1, 256], dtype=torch.int32))
    assert msg.data == b"\x01\x00\x00\x00\x00\x01\x00\x00"
    assert encode(torch.tensor([1.0], dtype=torch.bfloat16)).data == b"\x80\x3f"


@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("shape", [(0,), (3, 0, 2), (0, 0)])
def test_empty(name: str, shape: tuple[int, ...]) -> None:
    t = torch.empty(shape, dtype=DTYPES[name])
    msg = encode(t)
    assert msg.data == b"" and list(msg.shape) == list(shape)
    out = decode(msg)
    assert out.shape == shape and out.dtype == t.dtype and out.numel() == 0


@pytest.mark.parametrize("name", list(DTYPES))
def test_scalar(name: str) -> None:
    t = sample(DTYPES[name], (1,), seed=3).reshape(())
    msg = encode(t)
    assert list(msg.shape) == []
    out = decode(msg, expected_shape=())
    assert out.dim() == 0
    assert_identical(out, t)


@pytest.mark.parametrize(
    "make",
    [
        lambda t: t.t(),  # transposed
        lambda t: t[::2, 1::3],  # sliced with steps
        lambda t: t[3:],  # contiguous, but starts inside its storage
        lambda t: t[:, :1].expand(40, 5),  # stride 0
        lambda t: t.reshape(4, 10, 30).permute(2, 0, 1),  # permuted 3-d view
    ],
    ids=["transposed", "stepped", "offset", "expanded", "permuted"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_non_contiguous(make, dtype: torch.dtype) -> None:
    base = sample(dtype, (40, 30), seed=1)
    view = make(base)
    out = decode(encode(view))
    assert out.is_contiguous()
    assert_identical(out, view.contiguous())


def test_large_tensor() -> None:
    t = sample(torch.bfloat16, (1024, 2048), seed=2)  # 4 MiB
    assert_identical(decode(encode(t)), t)


def test_requires_grad_input() -> None:
    t = torch.randn(4, 4, requires_grad=True)
    out = decode(encode(t))
    assert not out.requires_grad
    assert torch.equal(out, t.detach())


def test_survives_protobuf_serialization() -> None:
    t = sample(torch.bfloat16, (5, 6, 7), seed=4)
    wire = encode(t).SerializeToString()
    assert_identical(decode(tensor_pb2.Tensor.FromString(wire)), t)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_encode_cuda_tensor() -> None:
    t = sample(torch.bfloat16, (64, 33), seed=5)
    out = decode(encode(t.cuda().t()))
    assert out.device.type == "cpu"
    assert_identical(out, t.t().contiguous())


# --- zero copy -------------------------------------------------------------------------


def test_decode_is_zero_copy() -> None:
    # protobuf's accessor hands out a fresh bytes object per read, so hold one and check
    # that the decoded tensor's memory is that object's buffer, not a copy of it.
    t = sample(torch.float32, (64, 64), seed=6)
    data = encode(t).data
    out = decode(SimpleNamespace(dtype="float32", shape=[64, 64], data=data))
    assert out.data_ptr() == buffer_address(data)
    assert_identical(out, t)


def test_decoded_tensor_outlives_message() -> None:
    t = sample(torch.float64, (256,), seed=7)
    msg = tensor_pb2.Tensor.FromString(encode(t).SerializeToString())
    out = decode(msg)
    del msg
    assert_identical(out, t)


def test_tiny_payload_is_copied() -> None:
    # One-byte bytes objects are shared by the whole interpreter; never alias them.
    data = b"\x07"
    out = decode(SimpleNamespace(dtype="uint8", shape=[1], data=data))
    out.add_(1)
    assert data == b"\x07" and out.item() == 8


def test_no_warning_from_read_only_buffer() -> None:
    # In a fresh process (torch warns once per process) with UserWarnings turned into errors.
    code = (
        "import torch; from tandem.core.wire.codec import decode, encode; "
        "decode(encode(torch.zeros(4096)))"
    )
    run = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr


# --- malformed messages ----------------------------------------------------------------


def test_wrong_byte_count() -> None:
    with pytest.raises(CodecError, match=r"payload has 10 bytes.*needs 3 \* 4 = 12 bytes"):
        decode(message("float32", [3], b"\x00" * 10))
    with pytest.raises(CodecError, match=r"payload has 4 bytes.*needs 0 \* 2 = 0 bytes"):
        decode(message("bfloat16", [2, 0], b"\x00" * 4))


@pytest.mark.parametrize("name", ["complex64", "float8_e4m3fn", "torch.float32", "", "FLOAT32"])
def test_unknown_dtype(name: str) -> None:
    with pytest.raises(CodecError, match=rf"unknown dtype '{name}'; allowed: float32, .*bool"):
        decode(message(name, [1], b"\x00" * 4))


def test_unknown_dtype_name_is_truncated() -> None:
    with pytest.raises(CodecError, match=r"unknown dtype 'x{32}\.\.\.'"):
        decode(message("x" * 10_000, [1], b"\x00"))


def test_negative_dim() -> None:
    with pytest.raises(CodecError, match=r"negative dim -3 at axis 1"):
        decode(message("float32", [2, -3], b""))


@pytest.mark.parametrize("shape", [[2**40, 2**40], [2**31, 2**31, 2**31], [2**63 - 1, 0]])
def test_huge_shape(shape: list[int]) -> None:
    with pytest.raises(CodecError, match=r"over the element limit|more than \d+ elements"):
        decode(message("uint8", shape, b""))


@pytest.mark.parametrize("shape", [[2**31 - 1, 2**31 - 1, 2**31 - 1, 0], [0, 2**31 - 1, 2**31 - 1, 2**31 - 1]])
def test_empty_shape_whose_strides_overflow(shape: list[int]) -> None:
    """Found by fuzzing: an empty shape whose other dims multiply past int64 made torch raise a bare
    RuntimeError ("Storage size calculation overflowed") instead of a CodecError."""
    with pytest.raises(CodecError, match=r"more than 2147483647 elements \(the limit; a dim of 0 counts as 1\)"):
        decode(message("float32", shape, b""))
    layout = tensor_pb2.TensorLayout(dtype="float32", row_shape=shape[1:])
    with pytest.raises(CodecError, match=r"more than 2147483647 elements"):
        decode_rows(b"", layout, shape[0])


def test_decode_rows_checks_rows_and_layout() -> None:
    layout = tensor_pb2.TensorLayout(dtype="float32", row_shape=[2])
    assert decode_rows(b"\x00" * 24, layout, 3).shape == (3, 2)
    with pytest.raises(CodecError, match=r"negative dim -1 at axis 0"):
        decode_rows(b"", layout, -1)
    with pytest.raises(CodecError, match=r"payload has 8 bytes, but the plan's 3 rows"):
        decode_rows(b"\x00" * 8, layout, 3)
    with pytest.raises(CodecError, match=r"unknown dtype 'complex64'"):
        decode_rows(b"", tensor_pb2.TensorLayout(dtype="complex64", row_shape=[2]), 0)


def test_numel_limit() -> None:
    limits = CodecLimits(max_numel=100)
    decode(message("int8", [10, 10], b"\x00" * 100), limits=limits)
    with pytest.raises(CodecError, match=r"more than 100 elements"):
        decode(message("int8", [10, 11], b"\x00" * 110), limits=limits)


def test_byte_limit() -> None:
    limits = CodecLimits(max_bytes=64)
    decode(message("float64", [8], b"\x00" * 64), limits=limits)
    with pytest.raises(CodecError, match=r"needs 72 bytes, over the limit of 64"):
        decode(message("float64", [9], b"\x00" * 72), limits=limits)


def test_rank_limit() -> None:
    with pytest.raises(CodecError, match=r"rank 9 is over the limit of 8"):
        decode(message("uint8", [1] * 9, b"\x00"))
    with pytest.raises(CodecError, match=r"rank 3 is over the limit of 2"):
        decode(message("uint8", [1, 1, 1], b"\x00"), limits=CodecLimits(max_rank=2))


def test_expected_shape_mismatch() -> None:
    msg = encode(torch.zeros(2, 3))
    assert decode(msg, expected_shape=[2, 3]).shape == (2, 3)
    with pytest.raises(CodecError, match=r"shape is \[2, 3\], expected \[3, 2\]"):
        decode(msg, expected_shape=(3, 2))
    with pytest.raises(CodecError, match=r"shape is \[2, 3\], expected \[6\]"):
        decode(msg, expected_shape=[6])


def test_expected_dtype_mismatch() -> None:
    msg = encode(torch.zeros(2, dtype=torch.bfloat16))
    assert decode(msg, expected_dtype=torch.bfloat16).dtype == torch.bfloat16
    assert decode(msg, expected_dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(CodecError, match=r"dtype is bfloat16, expected float16"):
        decode(msg, expected_dtype=torch.float16)
    with pytest.raises(CodecError, match=r"dtype is bfloat16, expected float32"):
        decode(msg, expected_dtype="float32")


def test_bool_payload_must_be_zero_or_one() -> None:
    with pytest.raises(CodecError, match=r"bool payload holds bytes other than 0 and 1"):
        decode(message("bool", [3], b"\x00\x01\x02"))


def test_encode_rejects_unsupported_tensors() -> None:
    with pytest.raises(CodecError, match=r"cannot encode dtype torch.complex64; allowed: "):
        encode(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(CodecError, match=r"cannot encode a torch.sparse_coo tensor"):
        encode(torch.zeros(2, 2).to_sparse())
