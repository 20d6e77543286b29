"""The tensor frames of the internal streams, each written and read here, side by side.

ActivationFrame (stage i -> stage i+1, StageWorker.Activations) and LogitsFrame (last stage ->
sampler, CpuSampler.Logits) carry one body each, a proto `oneof`: a whole Tensor (streams
without structure-aware transmission), or the stream's layout in its first frame and then raw
bytes per frame, shaped by the plan the receiver holds; a logits frame may instead name a slot
of a shared-memory ring. The writers are the stage's output streams (stage_worker.outputs), the
readers the stage's and the sampler's servicers; both sides call only this module, and every
check of untrusted bytes is core.codec's.

Errors a stream reports in a message rather than as its status (StepDone, SampledBatch) carry
an ErrorCode beside the text: `error_code` gives the code of an exception, `error_name` its name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tandem.core.errors import (
    AlreadyExistsError,
    CodecError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from tandem.core.wire import codec
from tandem.core.wire.shm_ring import RingReader
from tandem.v1 import common_pb2, cpu_sampler_pb2, stage_worker_pb2, tensor_pb2

# Activations as they arrived: a tensor [tokens, hidden], or raw bytes and the stream's layout
Arrived = torch.Tensor | tuple[bytes, tensor_pb2.TensorLayout]

# In a step plan's sampler table (StepPlan.sampler_addresses): the sampler the last stage hosts
# itself, whose rows are sampled in the stage's process instead of crossing a logits stream.
HOSTED_SAMPLER = ""

# --- ActivationFrame -----------------------------------------------------------------------


def activation_header(layout: tensor_pb2.TensorLayout) -> stage_worker_pb2.ActivationFrame:
    """A structure-aware stream's first frame: the layout of every row after it."""
    return stage_worker_pb2.ActivationFrame(layout=layout)


def activation_frame(step_id: int, hidden: torch.Tensor, structured: bool) -> stage_worker_pb2.ActivationFrame:
    """A step's hidden states [tokens, hidden]: raw bytes on a structure-aware stream, else a Tensor."""
    if structured:
        return stage_worker_pb2.ActivationFrame(step_id=step_id, data=codec.raw(hidden))
    return stage_worker_pb2.ActivationFrame(step_id=step_id, hidden=codec.encode(hidden))


class ActivationReader:
    """One Activations stream's frames, read in order; raw rows are shaped later by the plan."""

    def __init__(self, dtype: torch.dtype, hidden_size: int):
        self.dtype, self.hidden_size = dtype, hidden_size
        self.layout: tensor_pb2.TensorLayout | None = None

    def read(self, frame: stage_worker_pb2.ActivationFrame) -> Arrived | None:
        """The frame's activations; None for the layout frame (CodecError for a bad one)."""
        body = frame.WhichOneof("body")
        if body == "layout":
            self.layout = codec.check_layout(frame.layout, self.dtype, [self.hidden_size])
            return None
        if body == "hidden":
            hidden = codec.decode(frame.hidden, expected_dtype=self.dtype)
            if hidden.dim() != 2 or hidden.shape[1] != self.hidden_size:
                raise CodecError(f"step {frame.step_id}: activations {list(hidden.shape)}, expected [tokens, {self.hidden_size}]")
            return hidden
        if body is None:
            raise CodecError(f"step {frame.step_id}: an activation frame with no body (hidden, layout or data)")
        if self.layout is None:
            raise CodecError(f"step {frame.step_id}: raw activations before the stream's layout frame")
        return frame.data, self.layout


def shape_activations(arrived: Arrived, num_tokens: int) -> torch.Tensor:
    """Activations [num_tokens, hidden] as the step's plan shapes them (CodecError if they do not fit)."""
    if isinstance(arrived, tuple):
        data, layout = arrived
        return codec.decode_rows(data, layout, num_tokens)
    return arrived


# --- LogitsFrame ---------------------------------------------------------------------------


def logits_header(layout: tensor_pb2.TensorLayout, ring_id: str = "") -> cpu_sampler_pb2.LogitsFrame:
    """A structure-aware (or ring) stream's first frame: the row layout, and the ring's id if any."""
    return cpu_sampler_pb2.LogitsFrame(layout=layout, ring_id=ring_id)


def logits_frame(step_id: int, request_ids: Sequence[str], sample_indices: Sequence[int], logits: torch.Tensor,
                 structured: bool, slot: tuple[int, int] | None = None) -> cpu_sampler_pb2.LogitsFrame:
    """A step's logits [rows, vocab] float32 for one sampler: in a ring `slot` (index, bytes) or as
    raw bytes on a structure-aware stream (the rows are the step's SamplePlan's), else a Tensor
    with each row's request id and sample index."""
    frame = cpu_sampler_pb2.LogitsFrame(step_id=step_id)
    if not structured:
        frame.request_ids[:], frame.sample_indices[:] = request_ids, sample_indices
    if slot is not None:
        frame.ring_slot.index, frame.ring_slot.nbytes = slot
    elif structured:
        frame.data = codec.raw(logits)
    else:
        frame.logits.CopyFrom(codec.encode(logits))
    return frame


@dataclass(frozen=True)
class LogitsHeader:
    layout: tensor_pb2.TensorLayout
    ring_id: str


def read_logits_header(frame: cpu_sampler_pb2.LogitsFrame, vocab_size: int) -> LogitsHeader | None:
    """The stream's header if `frame` is one, checked against the receiver's vocabulary; else None."""
    if frame.WhichOneof("body") != "layout":
        return None
    layout = frame.layout
    if layout.dtype != "float32" or len(layout.row_shape) != 1:
        raise InvalidArgumentError(f"logits layout must be float32 [vocab], got {layout.dtype[:32]!r} "
                                   f"{list(layout.row_shape)[:8]}")
    if layout.row_shape[0] != vocab_size:
        raise InvalidArgumentError(f"logits layout rows are {layout.row_shape[0]} wide, but the vocabulary "
                                   f"has {vocab_size} tokens")
    return LogitsHeader(layout, frame.ring_id)


def carries_rows(frame: cpu_sampler_pb2.LogitsFrame) -> bool:
    """Whether the frame names its rows itself (a Tensor frame); else they are the step's plan's."""
    return frame.WhichOneof("body") == "logits" or bool(frame.request_ids)


def read_logits(frame: cpu_sampler_pb2.LogitsFrame, header: LogitsHeader | None, ring: RingReader | None,
                num_rows: int) -> tuple[torch.Tensor, int]:
    """A body frame's logits [rows, vocab] float32 and the bytes of them read from the ring (the
    caller frees the slot after sampling). Raw rows are shaped by `num_rows`, the plan's."""
    body = frame.WhichOneof("body")
    if body == "logits":
        return codec.decode(frame.logits, expected_dtype="float32"), 0
    if body is None:
        raise InvalidArgumentError("a logits frame with no body (logits, layout, data or ring_slot)")
    if header is None:
        raise InvalidArgumentError("raw logits before the stream's layout frame")
    if body == "data":
        return codec.decode_rows(frame.data, header.layout, num_rows), 0
    if ring is None:
        raise InvalidArgumentError("a ring slot on a stream without a ring")
    vocab = header.layout.row_shape[0]
    expected = num_rows * vocab * 4
    if frame.ring_slot.nbytes != expected:
        raise InvalidArgumentError(f"ring slot holds {frame.ring_slot.nbytes} bytes, but {num_rows} "
                                   f"rows of {vocab} float32 logits need {expected}")
    return ring.view(frame.ring_slot.index, expected, torch.float32).view(num_rows, vocab), expected


# --- stream error codes --------------------------------------------------------------------

_CODES: list[tuple[type[Exception], common_pb2.ErrorCode]] = [  # most specific first
    (InvalidArgumentError, common_pb2.ERROR_CODE_INVALID_ARGUMENT),
    (NotFoundError, common_pb2.ERROR_CODE_NOT_FOUND),
    (UnavailableError, common_pb2.ERROR_CODE_UNAVAILABLE),
    (DeadlineExceededError, common_pb2.ERROR_CODE_DEADLINE_EXCEEDED),
    (ResourceExhaustedError, common_pb2.ERROR_CODE_RESOURCE_EXHAUSTED),
    (FailedPreconditionError, common_pb2.ERROR_CODE_FAILED_PRECONDITION),
    (AlreadyExistsError, common_pb2.ERROR_CODE_FAILED_PRECONDITION),
]


def error_code(error: BaseException) -> common_pb2.ErrorCode:
    """The ErrorCode a stream reports `error` with: its kind for Tandem's typed errors, else INTERNAL."""
    return next((code for cls, code in _CODES if isinstance(error, cls)), common_pb2.ERROR_CODE_INTERNAL)


def error_name(code: int) -> str:
    """"INVALID_ARGUMENT", ...; "UNSPECIFIED" for 0 (a peer that sent no code) or a code newer than this build."""
    try:
        return common_pb2.ErrorCode.Name(code).removeprefix("ERROR_CODE_")
    except ValueError:
        return "UNSPECIFIED"
