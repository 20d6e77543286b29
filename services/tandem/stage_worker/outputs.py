"""A stage's outgoing tensor streams: activations to the next stage, logits to samplers.

Each is a long-lived client stream (StreamSender) whose frames are built in the stream's own
thread, after the step's output is handed over, so the executor goes on to the next step. With
structure-aware transmission a stream opens with one header frame holding the tensor layout
(and the shared-memory ring, if a sampler on this host attached one); every later frame is a
step tag and raw bytes, whose row count the receiver takes from the plan it already holds.
Without it, every frame carries its dtype, shape and (for logits) per-row request ids and
sample indices, as a pipeline that serializes per-step metadata with every tensor does.

Frames are built by core.frames, which also reads them on the other end.

Each stream counts what it sent (frames, bytes on the wire, raw tensor bytes, bytes handed over
in shared memory); only its own thread writes those counters.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc
import torch

from tandem.core.wire import codec, frames
from tandem.core.wire.shm_ring import RingWriter
from tandem.core.wire.streams import HANDOFF_WAIT_S, StreamSender
from tandem.v1 import cpu_sampler_pb2, cpu_sampler_pb2_grpc
from tandem.v1 import stage_worker_pb2 as pb
from tandem.v1 import stage_worker_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


@dataclass
class Traffic:
    frames: int = 0
    wire_bytes: int = 0  # serialized frames
    tensor_bytes: int = 0  # elements times element size of the tensors they carry
    shm_bytes: int = 0  # tensor bytes handed over through shared memory instead

    def count(self, frame, tensor_bytes: int = 0, shm_bytes: int = 0) -> None:
        self.frames += 1
        self.wire_bytes += frame.ByteSize()
        self.tensor_bytes += tensor_bytes
        self.shm_bytes += shm_bytes


@dataclass(frozen=True)
class RingOptions:
    slots: int
    slot_bytes: int
    wait_s: float  # how long a frame waits for a free slot before going over the stream instead


class ActivationStream:
    """Hidden states to the next stage, one frame per step."""

    def __init__(self, stub: pb_grpc.StageWorkerStub, name: str, layout: codec.tensor_pb2.TensorLayout,
                 structured: bool):
        self.name, self.layout, self.structured, self.traffic = name, layout, structured, Traffic()
        self._sender = StreamSender(lambda items: stub.Activations(self._frames(items)), name)

    def send(self, step_id: int, hidden: torch.Tensor) -> None:
        taken = threading.Event()
        self._sender.send((step_id, hidden, taken))
        taken.wait(HANDOFF_WAIT_S)

    def _frames(self, items: Iterator[tuple[int, torch.Tensor, threading.Event]]) -> Iterator[pb.ActivationFrame]:
        if self.structured:
            header = frames.activation_header(self.layout)
            self.traffic.count(header)
            yield header
        for step_id, hidden, taken in items:
            frame = frames.activation_frame(step_id, hidden, self.structured)
            self.traffic.count(frame, _nbytes(hidden))
            taken.set()
            yield frame

    def close(self) -> None:
        self._sender.close()


class LogitsStream:
    """Logits rows to one sampler replica; through a shared-memory ring when it can map one."""

    def __init__(self, stub: cpu_sampler_pb2_grpc.CpuSamplerStub, address: str, vocab_size: int,
                 structured: bool, ring: RingOptions | None):
        self.address, self.structured, self.ring_options = address, structured, ring
        self.name = f"logits->{address}"
        self.layout = codec.layout(torch.float32, [vocab_size])
        self.traffic = Traffic()
        self._stub = stub
        self._sender = StreamSender(lambda items: stub.Logits(self._frames(items)), self.name)

    def send(self, step_id: int, request_ids: Sequence[str], sample_indices: Sequence[int],
             logits: torch.Tensor) -> None:
        """Queue a frame: logits [rows, vocab] float32 for these requests' rows, in order."""
        self._sender.send((step_id, request_ids, sample_indices, logits))

    def _frames(self, items) -> Iterator[cpu_sampler_pb2.LogitsFrame]:
        ring = self._attach_ring() if self.ring_options else None
        if self.structured or ring:
            header = frames.logits_header(self.layout, ring.ring_id if ring else "")
            self.traffic.count(header)
            yield header
        for step_id, request_ids, sample_indices, logits in items:
            slot = ring.put(logits, self.ring_options.wait_s) if ring else None
            frame = frames.logits_frame(step_id, request_ids, sample_indices, logits, self.structured, slot)
            self.traffic.count(frame, _nbytes(logits), shm_bytes=slot[1] if slot else 0)
            yield frame

    def _attach_ring(self) -> RingWriter | None:
        """A ring the sampler has mapped, or None (another host, no /dev/shm, no space)."""
        opts = self.ring_options
        try:
            ring = RingWriter(opts.slots, opts.slot_bytes)
        except OSError as e:
            log.warning("no shared-memory ring for %s (%s); logits go over the stream", self.address, e)
            return None
        request = cpu_sampler_pb2.AttachLogitsRingRequest(ring_id=ring.ring_id, path=ring.path, nonce=ring.nonce,
                                                          slots=ring.slots, slot_bytes=ring.slot_bytes)
        try:
            self._stub.AttachLogitsRing(request, timeout=10)
        except grpc.RpcError as e:
            log.info("sampler %s cannot map a shared-memory ring (%s); logits go over the stream",
                     self.address, e.details())
            return None
        finally:
            ring.unlink()  # both ends have it mapped (or it is unused): nothing is left behind
        log.info("sampler %s reads logits from shared memory (%d slots of %d bytes)", self.address,
                 ring.slots, ring.slot_bytes)
        return ring

    def close(self) -> None:
        self._sender.close()


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
