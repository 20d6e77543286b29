"""The CpuSampler gRPC servicer (protobuf in, SamplerEngine call, protobuf out) and `serve`."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator

import grpc
import torch

from tandem.core import codec
from tandem.core.cpus import current_placement, parse_cpu_list, place_process
from tandem.core.errors import FailedPreconditionError, InvalidArgumentError, ResourceExhaustedError
from tandem.core.sampling import SamplingOptions, SequenceState
from tandem.core.server import Server
from tandem.core.shm_ring import RingReader
from tandem.cpu_sampler.config import MAX_TOKEN_ID_BOUND, SamplerConfig
from tandem.cpu_sampler.engine import FrameResult, SamplerEngine
from tandem.v1 import cpu_sampler_pb2 as pb
from tandem.v1 import cpu_sampler_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CpuSampler"].full_name  # tandem.v1.CpuSampler


class _Subscriber:
    """One Results stream: a bounded queue of batches; None in the queue ends the stream."""

    def __init__(self, max_queued: int):
        self.queue: queue.Queue[pb.SampledBatch | None] = queue.Queue(max_queued)
        self.max_queued = max_queued
        self.fell_behind = False

    def close(self) -> None:
        try:
            self.queue.put_nowait(None)
        except queue.Full:  # the stream is not waiting then; it sees the flag or goes away
            self.fell_behind = True


class Subscribers:
    """The current Results subscribers; `publish` hands a batch to each of them."""

    def __init__(self, max_queued: int):
        self._max_queued = max_queued
        self._lock = threading.Lock()
        self._subscribers: set[_Subscriber] = set()

    def __len__(self) -> int:
        return len(self._subscribers)

    def subscribe(self) -> _Subscriber:
        subscriber = _Subscriber(self._max_queued)
        with self._lock:
            self._subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: _Subscriber) -> None:
        with self._lock:
            self._subscribers.discard(subscriber)

    def publish(self, batch: pb.SampledBatch) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        if not subscribers:
            log.warning("step %d sampled with no Results subscriber; its tokens are dropped", batch.step_id)
        for subscriber in subscribers:
            try:
                subscriber.queue.put_nowait(batch)
            except queue.Full:
                subscriber.fell_behind = True
                self.unsubscribe(subscriber)


class CpuSamplerServicer(cpu_sampler_pb2_grpc.CpuSamplerServicer):
    """Adapts the CpuSampler RPCs to a SamplerEngine and a set of Results subscribers."""

    def __init__(self, config: SamplerConfig):
        self.config = config
        self.engine = SamplerEngine.from_config(config)
        self.subscribers = Subscribers(config.max_queued_batches)
        self._counter_lock = threading.Lock()
        self.sample_ns_total = self.sample_cpu_ns_total = 0
        self.wire_bytes_in_total = self.tensor_bytes_in_total = self.shm_bytes_in_total = 0
        self.plans = PlanBook(config.max_planned_steps)
        self._rings_lock = threading.Lock()
        self._rings: dict[str, RingReader] = {}  # attached, not yet claimed by a Logits stream

    def AddSequences(self, request: pb.AddSequencesRequest, context: grpc.ServicerContext
                     ) -> pb.AddSequencesResponse:
        self.engine.add([self._state(i, seq) for i, seq in enumerate(request.sequences)])
        return pb.AddSequencesResponse()

    def ReleaseSequences(self, request: pb.ReleaseSequencesRequest, context: grpc.ServicerContext
                         ) -> pb.ReleaseSequencesResponse:
        self.engine.release(request.request_ids)
        return pb.ReleaseSequencesResponse()

    def Plans(self, request_iterator: Iterator[pb.SamplePlan], context: grpc.ServicerContext) -> pb.PlansSummary:
        num_plans = 0
        for plan in request_iterator:
            if len(plan.request_ids) != len(plan.sample_indices):
                raise InvalidArgumentError(f"plan of step {plan.step_id} has {len(plan.request_ids)} request ids "
                                           f"and {len(plan.sample_indices)} sample indices")
            self.plans.put(plan)
            num_plans += 1
        return pb.PlansSummary(num_plans=num_plans)

    def AttachLogitsRing(self, request: pb.AttachLogitsRingRequest, context: grpc.ServicerContext
                         ) -> pb.AttachLogitsRingResponse:
        try:
            ring = RingReader(request.path, request.nonce, request.slots, request.slot_bytes)
        except FileNotFoundError as e:
            raise FailedPreconditionError(f"cannot map the logits ring: {e}") from None
        with self._rings_lock:
            self._rings[request.ring_id] = ring
        return pb.AttachLogitsRingResponse()

    def Logits(self, request_iterator: Iterator[pb.LogitsFrame], context: grpc.ServicerContext
               ) -> pb.LogitsSummary:
        """Frames carry a whole Tensor with their rows' request ids, or (structure-aware) the
        stream's header frame holds the layout and later frames only raw bytes or a ring slot,
        their rows being those of the step's SamplePlan."""
        num_frames, layout, ring = 0, None, None
        for frame in request_iterator:
            try:
                if frame.HasField("layout"):  # the header
                    layout, ring = self._header(frame)
                    continue
                self._sample_frame(frame, layout, ring)
            except InvalidArgumentError as e:
                raise InvalidArgumentError(f"logits frame {num_frames} (step {frame.step_id}): {e}") from None
            num_frames += 1
        return pb.LogitsSummary(num_frames=num_frames)

    def _header(self, frame: pb.LogitsFrame) -> tuple[codec.tensor_pb2.TensorLayout, RingReader | None]:
        if frame.layout.dtype != "float32" or len(frame.layout.row_shape) != 1:
            raise InvalidArgumentError(f"logits layout must be float32 [vocab], got {frame.layout.dtype[:32]!r} "
                                       f"{list(frame.layout.row_shape)[:8]}")
        if not frame.ring_id:
            return frame.layout, None
        with self._rings_lock:
            ring = self._rings.pop(frame.ring_id, None)
        if ring is None:
            raise InvalidArgumentError(f"unknown ring id {frame.ring_id[:64]!r}: attach it first")
        return frame.layout, ring

    def _sample_frame(self, frame: pb.LogitsFrame, layout, ring: RingReader | None) -> None:
        request_ids, sample_indices = frame.request_ids, frame.sample_indices
        if not request_ids and not frame.HasField("logits"):  # the rows are in the step's plan
            plan = self.plans.take(frame.step_id, self.config.plan_wait_s)
            if plan is None:
                self.subscribers.publish(pb.SampledBatch(
                    step_id=frame.step_id, error=f"no plan for step {frame.step_id} within {self.config.plan_wait_s}s"))
                return
            request_ids, sample_indices = plan.request_ids, plan.sample_indices
        shm_bytes = 0
        if frame.HasField("logits"):
            logits = codec.decode(frame.logits, expected_dtype="float32")  # [rows, vocab]
        elif layout is None:
            raise InvalidArgumentError("raw logits before the stream's layout frame")
        elif frame.HasField("ring_slot"):
            if ring is None:
                raise InvalidArgumentError("a ring slot on a stream without a ring")
            vocab = layout.row_shape[0]
            expected = len(request_ids) * vocab * 4
            if frame.ring_slot.nbytes != expected:
                raise InvalidArgumentError(f"ring slot holds {frame.ring_slot.nbytes} bytes, but {len(request_ids)} "
                                           f"rows of {vocab} float32 logits need {expected}")
            logits = ring.view(frame.ring_slot.index, expected, torch.float32).view(len(request_ids), vocab)
            shm_bytes = expected
        else:
            logits = codec.decode_rows(frame.data, layout, len(request_ids))
        try:
            self.sample(frame.step_id, request_ids, sample_indices, logits)
        finally:
            if shm_bytes:
                ring.free(frame.ring_slot.index)
        with self._counter_lock:
            self.wire_bytes_in_total += frame.ByteSize()
            self.tensor_bytes_in_total += logits.numel() * logits.element_size()
            self.shm_bytes_in_total += shm_bytes

    def sample(self, step_id: int, request_ids, sample_indices, logits) -> None:
        """Sample one frame's rows and publish the tokens to every Results subscriber. The
        Logits stream calls this; so does a last stage that samples in-process (baseline)."""
        cpu = time.process_time_ns()
        result = self.engine.sample_frame(request_ids, sample_indices, logits)
        with self._counter_lock:
            self.sample_ns_total += result.sample_ns
            self.sample_cpu_ns_total += time.process_time_ns() - cpu
        self.subscribers.publish(_batch(step_id, result))

    def Results(self, request: pb.ResultsRequest, context: grpc.ServicerContext
                ) -> Iterator[pb.SampledBatch]:
        subscriber = self.subscribers.subscribe()
        try:
            if not context.add_callback(subscriber.close):  # runs on cancel or server stop
                return  # the RPC already ended
            yield pb.SampledBatch(step_id=0)  # confirms the subscription: from here on, no batch is missed
            while True:
                if subscriber.fell_behind:
                    raise ResourceExhaustedError(
                        f"Results subscriber fell {subscriber.max_queued} batches behind; resubscribe")
                batch = subscriber.queue.get()
                if batch is None:
                    return
                yield batch
        finally:
            self.subscribers.unsubscribe(subscriber)

    def GetSamplerInfo(self, request: pb.GetSamplerInfoRequest, context: grpc.ServicerContext
                       ) -> pb.GetSamplerInfoResponse:
        placement = current_placement()
        return pb.GetSamplerInfoResponse(
            num_sequences=self.engine.num_sequences,
            num_frames_total=self.engine.num_frames_total,
            num_rows_total=self.engine.num_rows_total,
            sample_ns_total=self.sample_ns_total,
            wire_bytes_in_total=self.wire_bytes_in_total,
            tensor_bytes_in_total=self.tensor_bytes_in_total,
            sample_cpu_ns_total=self.sample_cpu_ns_total,
            shm_bytes_in_total=self.shm_bytes_in_total,
            torch_threads=placement.num_threads, num_threads=self.config.num_threads,
            num_interop_threads=placement.num_interop_threads, cpus=placement.cpus,
        )

    def _state(self, position: int, seq: pb.SamplerSequence) -> SequenceState:
        """Validate one SamplerSequence. Until the vocabulary is known, token ids are only
        bounded by int32 here; the engine checks them against it (see SamplerEngine)."""
        id_bound = self.engine.vocab_size or MAX_TOKEN_ID_BOUND
        try:
            options = SamplingOptions.from_proto(seq.params, id_bound, self.config.max_tokens_limit)
            return SequenceState(seq.request_id, options, seq.seed, seq.prompt_ids,
                                 seq.output_ids, seq.min_tokens_blocked_ids)
        except InvalidArgumentError as e:
            raise InvalidArgumentError(f"sequences[{position}] (request {seq.request_id!r}): {e}") from None


class PlanBook:
    """Row plans by step, from the coordinator's Plans stream, taken by the Logits stream.

    A frame may arrive before its plan (the streams are independent): `take` waits for it. Plans
    whose frame never comes (a failed step) are dropped oldest first beyond `capacity`.
    """

    def __init__(self, capacity: int):
        self._capacity = capacity
        self._plans: dict[int, pb.SamplePlan] = {}
        self._arrived = threading.Condition()

    def put(self, plan: pb.SamplePlan) -> None:
        with self._arrived:
            self._plans[plan.step_id] = plan
            while len(self._plans) > self._capacity:
                del self._plans[next(iter(self._plans))]
            self._arrived.notify_all()

    def take(self, step_id: int, timeout_s: float) -> pb.SamplePlan | None:
        deadline = time.monotonic() + timeout_s
        with self._arrived:
            while step_id not in self._plans:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._arrived.wait(left)
            return self._plans.pop(step_id)


def _batch(step_id: int, result: FrameResult) -> pb.SampledBatch:
    tokens = [
        pb.SampledToken(request_id=row.request_id, sample_index=row.sample_index,
                        token_id=row.token_id, logprobs=row.logprobs)
        for row in result.rows
    ]
    return pb.SampledBatch(step_id=step_id, tokens=tokens, sample_ns=result.sample_ns, error=result.error)


def serve(config: SamplerConfig, servicer: CpuSamplerServicer | None = None) -> Server:
    """Start a replica on config.host:config.port and mark it ready; the caller stops it.

    `servicer` defaults to a fresh CpuSamplerServicer(config); pass one to observe it.
    """
    config.validate()
    place_process(parse_cpu_list(config.cpus), config.torch_threads, "cpu-sampler")
    servicer = servicer or CpuSamplerServicer(config)
    server = Server(config.host, config.port, max_workers=config.max_workers)
    server.add(cpu_sampler_pb2_grpc.add_CpuSamplerServicer_to_server, servicer, [SERVICE_NAME])
    server.start()
    server.set_ready()  # nothing to warm up: no model; state arrives with AddSequences
    return server
