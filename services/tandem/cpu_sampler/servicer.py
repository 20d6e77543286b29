"""The CpuSampler gRPC servicer (protobuf in, SamplerEngine call, protobuf out) and `serve`."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator

import grpc

from tandem.core import codec
from tandem.core.errors import InvalidArgumentError, ResourceExhaustedError
from tandem.core.sampling import SamplingOptions, SequenceState
from tandem.core.server import Server
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
        self.sample_ns_total = self.wire_bytes_in_total = self.tensor_bytes_in_total = 0

    def AddSequences(self, request: pb.AddSequencesRequest, context: grpc.ServicerContext
                     ) -> pb.AddSequencesResponse:
        self.engine.add([self._state(i, seq) for i, seq in enumerate(request.sequences)])
        return pb.AddSequencesResponse()

    def ReleaseSequences(self, request: pb.ReleaseSequencesRequest, context: grpc.ServicerContext
                         ) -> pb.ReleaseSequencesResponse:
        self.engine.release(request.request_ids)
        return pb.ReleaseSequencesResponse()

    def Logits(self, request_iterator: Iterator[pb.LogitsFrame], context: grpc.ServicerContext
               ) -> pb.LogitsSummary:
        num_frames = 0
        for frame in request_iterator:
            try:
                logits = codec.decode(frame.logits, expected_dtype="float32")  # [rows, vocab]
                self.sample(frame.step_id, frame.request_ids, frame.sample_indices, logits)
            except InvalidArgumentError as e:
                raise InvalidArgumentError(f"logits frame {num_frames} (step {frame.step_id}): {e}") from None
            with self._counter_lock:
                self.wire_bytes_in_total += frame.ByteSize()
                self.tensor_bytes_in_total += logits.numel() * logits.element_size()
            num_frames += 1
        return pb.LogitsSummary(num_frames=num_frames)

    def sample(self, step_id: int, request_ids, sample_indices, logits) -> None:
        """Sample one frame's rows and publish the tokens to every Results subscriber. The
        Logits stream calls this; so does a last stage that samples in-process (baseline)."""
        result = self.engine.sample_frame(request_ids, sample_indices, logits)
        with self._counter_lock:
            self.sample_ns_total += result.sample_ns
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
        return pb.GetSamplerInfoResponse(
            num_sequences=self.engine.num_sequences,
            num_frames_total=self.engine.num_frames_total,
            num_rows_total=self.engine.num_rows_total,
            sample_ns_total=self.sample_ns_total,
            wire_bytes_in_total=self.wire_bytes_in_total,
            tensor_bytes_in_total=self.tensor_bytes_in_total,
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
    servicer = servicer or CpuSamplerServicer(config)
    server = Server(config.host, config.port, max_workers=config.max_workers)
    server.add(cpu_sampler_pb2_grpc.add_CpuSamplerServicer_to_server, servicer, [SERVICE_NAME])
    server.start()
    server.set_ready()  # nothing to warm up: no model; state arrives with AddSequences
    return server
