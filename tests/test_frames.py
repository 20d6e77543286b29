"""core.frames owns each tensor frame of the internal streams: what its writer builds, its reader
takes back; a frame carries one body (a proto oneof); stream errors carry a code."""

from __future__ import annotations

import pytest
import torch

from tandem.core.errors import CodecError, InvalidArgumentError, NotFoundError, UnavailableError
from tandem.core.wire import codec, frames
from tandem.v1 import common_pb2, cpu_sampler_pb2, stage_worker_pb2

HIDDEN, VOCAB = 8, 16


@pytest.mark.parametrize("structured", [False, True])
def test_activations_come_back_as_written(structured):
    hidden = torch.randn(3, HIDDEN)
    reader = frames.ActivationReader(torch.float32, HIDDEN)
    if structured:
        assert reader.read(frames.activation_header(codec.layout(torch.float32, [HIDDEN]))) is None
    arrived = reader.read(frames.activation_frame(7, hidden, structured))
    assert torch.equal(frames.shape_activations(arrived, 3), hidden)
    if structured:
        with pytest.raises(CodecError):
            frames.shape_activations(arrived, 4)  # the plan says 4 tokens: the bytes hold 3


def test_an_activation_frame_carries_one_body_and_none_is_refused():
    frame = stage_worker_pb2.ActivationFrame(layout=codec.layout(torch.float32, [HIDDEN]))
    frame.data = b"\0" * 4 * HIDDEN  # the oneof keeps the last body set
    assert frame.WhichOneof("body") == "data" and not frame.HasField("layout")
    reader = frames.ActivationReader(torch.float32, HIDDEN)
    with pytest.raises(CodecError, match="no body"):
        reader.read(stage_worker_pb2.ActivationFrame(step_id=3))
    with pytest.raises(CodecError, match="before the stream's layout frame"):
        reader.read(frame)
    with pytest.raises(CodecError, match="row shape"):
        reader.read(frames.activation_header(codec.layout(torch.float32, [HIDDEN + 1])))


@pytest.mark.parametrize("structured", [False, True])
def test_logits_come_back_as_written(structured):
    logits = torch.randn(2, VOCAB)
    header = None
    if structured:
        header = frames.read_logits_header(frames.logits_header(codec.layout(torch.float32, [VOCAB])), VOCAB)
    frame = frames.logits_frame(5, ["a", "b"], [0, 3], logits, structured)
    assert frames.read_logits_header(frame, VOCAB) is None
    assert frames.carries_rows(frame) is not structured
    if not structured:
        assert (list(frame.request_ids), list(frame.sample_indices)) == (["a", "b"], [0, 3])
    got, shm_bytes = frames.read_logits(frame, header, None, num_rows=2)
    assert torch.equal(got, logits) and shm_bytes == 0


def test_a_logits_frame_is_checked_before_its_bytes_are_read():
    with pytest.raises(InvalidArgumentError, match=f"rows are {VOCAB + 1} wide, but the vocabulary has {VOCAB}"):
        frames.read_logits_header(frames.logits_header(codec.layout(torch.float32, [VOCAB + 1])), VOCAB)
    with pytest.raises(InvalidArgumentError, match="no body"):
        frames.read_logits(cpu_sampler_pb2.LogitsFrame(step_id=1), None, None, 1)
    header = frames.read_logits_header(frames.logits_header(codec.layout(torch.float32, [VOCAB])), VOCAB)
    slot = cpu_sampler_pb2.LogitsFrame(step_id=1, ring_slot=cpu_sampler_pb2.RingSlot(index=0, nbytes=4 * VOCAB))
    with pytest.raises(InvalidArgumentError, match="without a ring"):
        frames.read_logits(slot, header, None, 1)


def test_stream_errors_carry_their_kind():
    assert frames.error_code(InvalidArgumentError("x")) == common_pb2.ERROR_CODE_INVALID_ARGUMENT
    assert frames.error_code(CodecError("x")) == common_pb2.ERROR_CODE_INVALID_ARGUMENT
    assert frames.error_code(NotFoundError("x")) == common_pb2.ERROR_CODE_NOT_FOUND
    assert frames.error_code(UnavailableError("x")) == common_pb2.ERROR_CODE_UNAVAILABLE
    assert frames.error_code(RuntimeError("x")) == common_pb2.ERROR_CODE_INTERNAL
    assert frames.error_name(common_pb2.ERROR_CODE_INVALID_ARGUMENT) == "INVALID_ARGUMENT"
    assert frames.error_name(0) == frames.error_name(999) == "UNSPECIFIED"  # an older peer, or a newer one
    done = stage_worker_pb2.StepDone(step_id=1, error="boom", error_code=frames.error_code(InvalidArgumentError("x")))
    assert stage_worker_pb2.StepDone.FromString(done.SerializeToString()).error_code == common_pb2.ERROR_CODE_INVALID_ARGUMENT
