"""One sampler replica at work, gRPC-free: sequences, plans and logits frames in, sampled batches out.

A `SamplerRunner` holds the SamplerEngine (the sequences and their sampling), the plans of
structure-aware steps, the shared-memory rings stages attached, and the Results subscribers each
sampled batch is published to. cpu_sampler.servicer adapts the CpuSampler RPCs to it; a last stage
that samples in-process (the baseline preset) calls `sample` itself (tandem.compose wires it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence

import torch

from tandem.core import tracing
from tandem.core.errors import FailedPreconditionError, InvalidArgumentError
from tandem.core.metrics import Metrics
from tandem.core.sampling.reference import SamplingOptions, SequenceState
from tandem.core.wire.frames import LogitsHeader, carries_rows, read_logits, read_logits_header
from tandem.core.wire.shm_ring import RingReader
from tandem.cpu_sampler.config import SamplerConfig
from tandem.cpu_sampler.engine import FrameResult, SamplerEngine
from tandem.cpu_sampler.handoff import PlanBook, Subscribers
from tandem.v1 import common_pb2
from tandem.v1 import cpu_sampler_pb2 as pb


class SamplerRunner:
    """A replica's state and work; `metrics` gets its `tandem:sampler_*` metrics, labelled `sampler=name`."""

    def __init__(self, config: SamplerConfig, metrics: Metrics | None = None, name: str = ""):
        self.config = config
        self.engine = SamplerEngine.from_config(config)
        self.subscribers = Subscribers(config.max_queued_batches)
        self.plans = PlanBook(config.max_planned_steps)
        self.metrics = metrics or Metrics()
        self._meters = _SamplerMeters(self, name)
        self._counter_lock = threading.Lock()
        self.sample_ns_total = self.sample_cpu_ns_total = 0
        self.wire_bytes_in_total = self.tensor_bytes_in_total = self.shm_bytes_in_total = 0
        self._rings_lock = threading.Lock()
        self._rings: dict[str, RingReader] = {}  # attached, not yet claimed by a Logits stream

    def add(self, sequences: Sequence[pb.SamplerSequence]) -> None:
        """Take over these sequences, all or none (InvalidArgumentError names the first bad one)."""
        self.engine.add([self._state(i, seq) for i, seq in enumerate(sequences)])

    def release(self, request_ids: Iterable[str]) -> None:
        self.engine.release(request_ids)

    def put_plan(self, plan: pb.SamplePlan) -> None:
        if len(plan.request_ids) != len(plan.sample_indices):
            raise InvalidArgumentError(f"plan of step {plan.step_id} has {len(plan.request_ids)} request ids "
                                       f"and {len(plan.sample_indices)} sample indices")
        self.plans.put(plan)

    def attach_ring(self, ring_id: str, path: str, nonce: bytes, slots: int, slot_bytes: int) -> None:
        """Map a stage's shared-memory ring; the Logits stream whose header names `ring_id` reads it."""
        try:
            ring = RingReader(path, nonce, slots, slot_bytes)
        except FileNotFoundError as e:
            raise FailedPreconditionError(f"cannot map the logits ring: {e}") from None
        with self._rings_lock:
            self._rings[ring_id] = ring

    def take_logits(self, frames: Iterable[pb.LogitsFrame]) -> int:
        """Sample one Logits stream's frames; returns how many carried logits.

        Frames carry a whole Tensor with their rows' request ids, or (structure-aware) the
        stream's header frame holds the layout and later frames only raw bytes or a ring slot,
        their rows being those of the step's SamplePlan.
        """
        num_frames, header, ring = 0, None, None
        for frame in frames:
            try:
                if (found := read_logits_header(frame, self.engine.vocab_size)) is not None:
                    header, ring = found, self._ring(found.ring_id)
                    continue
                self._sample_frame(frame, header, ring)
            except InvalidArgumentError as e:
                raise InvalidArgumentError(f"logits frame {num_frames} (step {frame.step_id}): {e}") from None
            num_frames += 1
        return num_frames

    def sample(self, step_id: int, request_ids: Sequence[str], sample_indices: Sequence[int],
               logits: torch.Tensor, traceparent: str = "",
               first: Callable[[list[tuple[str, int]]], None] | None = None) -> list[tuple[str, int]]:
        """Sample one frame's rows (logits [rows, vocab] float32) and publish the tokens to every
        Results subscriber, in a span under the step's `traceparent` when the step is traced; returns
        the (request id, token) of each row sampled. The Logits stream calls this; so does a last
        stage that samples in-process, passing `first`, which gets those tokens before the
        subscribers do (stage 0 waits for them; the coordinator can wait a little)."""
        cpu = time.process_time_ns()
        with tracing.child_span("cpu_sampler", "sample", traceparent, {
                "tandem.step_id": step_id, "tandem.num_rows": len(request_ids)}):
            result = self.engine.sample_frame(request_ids, sample_indices, logits)
        with self._counter_lock:
            self.sample_ns_total += result.sample_ns
            self.sample_cpu_ns_total += time.process_time_ns() - cpu
        self._meters.sampled(result)
        tokens = [(row.request_id, row.token_id) for row in result.rows]
        if first is not None:
            first(tokens)
        self.subscribers.publish(_batch(step_id, result))
        return tokens

    def close(self) -> None:
        self.engine.close()

    def _ring(self, ring_id: str) -> RingReader | None:
        """The attached ring a stream's header names (claimed by that stream), or None for none."""
        if not ring_id:
            return None
        with self._rings_lock:
            ring = self._rings.pop(ring_id, None)
        if ring is None:
            raise InvalidArgumentError(f"unknown ring id {ring_id[:64]!r}: attach it first")
        return ring

    def _sample_frame(self, frame: pb.LogitsFrame, header: LogitsHeader | None, ring: RingReader | None) -> None:
        request_ids, sample_indices, traceparent = frame.request_ids, frame.sample_indices, ""
        if not carries_rows(frame):  # the rows are in the step's plan
            plan = self.plans.take(frame.step_id, self.config.plan_wait_s)
            if plan is None:
                self.subscribers.publish(pb.SampledBatch(
                    step_id=frame.step_id, error=f"no plan for step {frame.step_id} within {self.config.plan_wait_s}s",
                    error_code=common_pb2.ERROR_CODE_DEADLINE_EXCEEDED))
                return
            request_ids, sample_indices, traceparent = plan.request_ids, plan.sample_indices, plan.traceparent
        logits, shm_bytes = read_logits(frame, header, ring, len(request_ids))  # [rows, vocab]
        try:
            self.sample(frame.step_id, request_ids, sample_indices, logits, traceparent)
        finally:
            if shm_bytes:
                ring.free(frame.ring_slot.index)
        with self._counter_lock:
            self.wire_bytes_in_total += frame.ByteSize()
            self.tensor_bytes_in_total += logits.numel() * logits.element_size()
            self.shm_bytes_in_total += shm_bytes

    def _state(self, position: int, seq: pb.SamplerSequence) -> SequenceState:
        """Validate one SamplerSequence against the replica's vocabulary."""
        try:
            options = SamplingOptions.from_proto(seq.params, self.engine.vocab_size, self.config.max_tokens_limit)
            return SequenceState(seq.request_id, options, seq.seed, seq.prompt_ids,
                                 seq.output_ids, seq.min_tokens_blocked_ids)
        except InvalidArgumentError as e:
            raise InvalidArgumentError(f"sequences[{position}] (request {seq.request_id!r}): {e}") from None


class _SamplerMeters:
    """The runner's `tandem:sampler_*` metrics (docs/metrics.md)."""

    def __init__(self, runner: SamplerRunner, name: str):
        m, labels = runner.metrics, {"sampler": name}
        self.sample_seconds = m.histogram("sampler_sample_seconds", "Time to sample one micro-batch (a logits frame)",
                                          ["sampler"]).labels(**labels)
        self.rows = m.counter("sampler_rows", "Rows sampled: one token each", ["sampler"]).labels(**labels)
        m.gauge("sampler_num_sequences", "Sequences held", ["sampler"]).labels(**labels).set_function(
            lambda: runner.engine.num_sequences)
        m.gauge("sampler_num_queued_batches", "Sampled batches queued for Results streams, not yet sent",
                ["sampler"]).labels(**labels).set_function(lambda: runner.subscribers.num_queued)
        m.gauge("sampler_num_planned_steps", "Step plans waiting for their logits", ["sampler"]).labels(
            **labels).set_function(lambda: len(runner.plans))

    def sampled(self, result: FrameResult) -> None:
        self.sample_seconds.observe(result.sample_ns / 1e9)
        self.rows.inc(len(result.rows))


def _batch(step_id: int, result: FrameResult) -> pb.SampledBatch:
    tokens = [
        pb.SampledToken(request_id=row.request_id, sample_index=row.sample_index,
                        token_id=row.token_id, logprobs=row.logprobs)
        for row in result.rows
    ]
    code = common_pb2.ERROR_CODE_INVALID_ARGUMENT if result.error else common_pb2.ERROR_CODE_UNSPECIFIED
    return pb.SampledBatch(step_id=step_id, tokens=tokens, sample_ns=result.sample_ns, error=result.error,
                           error_code=code)
