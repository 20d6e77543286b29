"""Fuzz targets: each takes one serialized message, as a stranger could send it, and feeds it to the
code that reads it on a real service. The only error allowed out is InvalidArgumentError (the
services answer it INVALID_ARGUMENT); any other exception, a hang or a blow-up is a finding. Some
targets check more than that: a decoded tensor re-encodes to the same message, a plan that passes
the checks computes, a request the coordinator takes is one its samplers take, and a sampler
still samples a good frame after a bad one.

The services are built in-process around the bundled tiny model, without servers.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch
from google.protobuf.message import DecodeError, Message

import tandem.assets
from tandem.core.errors import InvalidArgumentError, NotFoundError
from tandem.core.wire import codec
from tandem.v1 import coordinator_pb2, cpu_sampler_pb2, stage_worker_pb2, tensor_pb2

MODEL = Path(tandem.assets.__file__).parent / "tiny"
VOCAB = 32  # the fuzzed sampler's vocabulary
_ids = itertools.count()


@dataclass(frozen=True)
class Target:
    message: type[Message]
    check: Callable[[Message], None]
    setup: Callable[[], object] = field(default=lambda: None)

    def one_input(self, data: bytes) -> None:
        try:
            message = self.message.FromString(data)
        except DecodeError:
            return  # the servers answer INVALID_ARGUMENT before any handler runs (core.interceptors)
        try:
            self.check(message)
        except InvalidArgumentError:
            pass


# --- codec -----------------------------------------------------------------------------


def check_tensor(message: tensor_pb2.Tensor) -> None:
    """decode and decode_rows agree on the same bytes; what decodes re-encodes to the message."""
    try:
        tensor = codec.decode(message)
    except InvalidArgumentError:
        tensor = None
    if message.shape:
        layout = tensor_pb2.TensorLayout(dtype=message.dtype, row_shape=message.shape[1:])
        try:
            rows = codec.decode_rows(message.data, layout, message.shape[0])
        except InvalidArgumentError:
            rows = None
        assert (rows is None) == (tensor is None), "decode and decode_rows disagree"
        assert rows is None or rows.shape == tensor.shape and codec.raw(rows) == codec.raw(tensor)
    if tensor is not None:
        again = codec.encode(tensor)
        assert (again.dtype, list(again.shape), again.data) == (message.dtype, list(message.shape), message.data)


# --- stage: activation frames and step plans -------------------------------------------


class _NoPeers:
    """A stage's peers when nothing is sent anywhere."""

    has_kv_store = False

    def hops(self) -> dict:
        return {}


@cache
def stage(stage_index: int, num_stages: int):
    """A stage's servicer around its runner and executor (no server, no threads, no peers)."""
    from tandem.stage_worker.config import StageWorkerConfig
    from tandem.stage_worker.executor import StageExecutor
    from tandem.stage_worker.runner import StageRunner
    from tandem.stage_worker.servicer import StageWorkerServicer

    config = StageWorkerConfig(model=str(MODEL), stage_index=stage_index, num_stages=num_stages,
                               num_blocks=32, block_size=4, metrics_port=-1)
    runner = StageRunner(config, _NoPeers())  # type: ignore[arg-type]  # never sends
    runner.executor = StageExecutor(config)
    return StageWorkerServicer(runner)


def check_activation_frame(frame: stage_worker_pb2.ActivationFrame) -> None:
    """The frame alone, after a good layout frame, and before a good raw frame; then each step
    it stored is shaped by a plan of as many rows as its bytes could hold, and of one more."""
    servicer = stage(1, 2)
    runner = servicer.runner
    ex = runner.executor
    hidden_size, itemsize = ex.model_config.hidden_size, ex.dtype.itemsize
    header = stage_worker_pb2.ActivationFrame(layout=codec.layout(ex.dtype, [hidden_size]))
    good = stage_worker_pb2.ActivationFrame(step_id=frame.step_id, data=bytes(2 * hidden_size * itemsize))
    for frames in ([frame], [header, frame], [frame, good]):
        try:
            servicer.Activations(iter(frames), None)
        except InvalidArgumentError:
            pass
        arrivals = runner._arrivals
        stored, rows = arrivals.take_all_activations(), len(frame.data) // (hidden_size * itemsize)
        for step_id, hidden in stored.items():
            for num_tokens in (rows, rows + 1):
                arrivals.put_activations(step_id, hidden)
                try:
                    runner._wait_activations(step_id, num_tokens, arrivals.epoch)
                except InvalidArgumentError:
                    pass


def check_step_plan(plan: stage_worker_pb2.StepPlan) -> None:
    """A plan the stage's checks let through computes logits for each sequence, on the first and
    last stage; a first stage of two and a last stage of two prepare it alike."""
    kv: dict[str, torch.Tensor] = {}

    def get(request_id: str) -> torch.Tensor:
        if request_id not in kv:
            raise NotFoundError(f"no blocks for {request_id!r}")
        return kv[request_id]

    from tandem.stage_worker.tables import PlanTables

    stages = [stage(0, 1), stage(0, 2), stage(1, 2)]
    for s in stages:  # each input starts from empty tables, as a fresh stage would
        s.runner.executor.tables = PlanTables(s.runner.executor.config.num_blocks)
    ex = stages[0].runner.executor
    inputs = ex.prepare(plan, {})  # takes the plan's table changes first, as the stage's preparer does
    ex.swap_out(plan, kv.__setitem__)
    try:
        ex.swap_in(plan, get)
    except NotFoundError:
        pass
    prepared = [s.runner.executor.prepare(plan, {}) for s in stages[1:]]
    if inputs is None or inputs.num_tokens > 256:  # big plans are checked, not run
        return
    assert all(p is not None and p.num_tokens == inputs.num_tokens for p in prepared)
    logits = ex.run(plan, inputs, None).logits
    assert logits.shape == (len(plan.sequences), ex.model_config.vocab_size), list(logits.shape)


# --- sampler: logits frames ------------------------------------------------------------


@cache
def sampler():
    from tandem.cpu_sampler.config import SamplerConfig
    from tandem.cpu_sampler.runner import SamplerRunner
    from tandem.cpu_sampler.servicer import CpuSamplerServicer

    servicer = CpuSamplerServicer(SamplerRunner(SamplerConfig(vocab_size=VOCAB, plan_wait_s=0.001, metrics_port=-1)))
    add_sequences(servicer, ["a", "b"])
    return servicer


def add_sequences(servicer, request_ids: list[str]) -> None:
    servicer.AddSequences(cpu_sampler_pb2.AddSequencesRequest(sequences=[
        cpu_sampler_pb2.SamplerSequence(request_id=r, seed=1, prompt_ids=[1, 2]) for r in request_ids]), None)


def check_logits_frame(frame: cpu_sampler_pb2.LogitsFrame) -> None:
    """The frame alone, after a good layout frame, and before a good raw frame; then a fresh
    sequence must still get its token from a good frame (a bad frame must not spoil the replica)."""
    servicer = sampler()
    header = cpu_sampler_pb2.LogitsFrame(layout=tensor_pb2.TensorLayout(dtype="float32", row_shape=[VOCAB]))
    good = cpu_sampler_pb2.LogitsFrame(step_id=frame.step_id, request_ids=["a"], sample_indices=[0],
                                       data=bytes(VOCAB * 4))
    for frames in ([frame], [header, frame], [frame, good]):
        try:
            servicer.Logits(iter(frames), None)
        except InvalidArgumentError:
            pass
    fresh = f"fresh-{next(_ids)}"
    add_sequences(servicer, [fresh])
    subscriber = servicer.runner.subscribers.subscribe()
    try:
        logits = codec.encode(torch.zeros(1, VOCAB))
        servicer.Logits(iter([cpu_sampler_pb2.LogitsFrame(step_id=1, request_ids=[fresh], sample_indices=[0],
                                                          logits=logits)]), None)
        batch = subscriber.queue.get_nowait()
        assert not batch.error and [t.request_id for t in batch.tokens] == [fresh], batch
    finally:
        servicer.runner.subscribers.unsubscribe(subscriber)
        servicer.runner.engine.release([fresh])


# --- coordinator: Generate requests ----------------------------------------------------


@cache
def coordinator():
    from tandem.coordinator.config import CoordinatorConfig
    from tandem.coordinator.servicer import CoordinatorServicer
    from tandem.core.modeling.model_config import ModelConfig
    from tandem.core.tokenizer import Tokenizer

    return CoordinatorServicer(CoordinatorConfig(model=str(MODEL)), None, None, Tokenizer.from_dir(MODEL),  # type: ignore[arg-type]
                               ModelConfig.from_dir(MODEL), block_bytes=0, metrics=None)  # type: ignore[arg-type]


@cache
def model_sampler():
    from tandem.cpu_sampler.config import SamplerConfig
    from tandem.cpu_sampler.runner import SamplerRunner

    return SamplerRunner(SamplerConfig(vocab_size=coordinator().model.vocab_size, metrics_port=-1))


def check_generate_request(request: coordinator_pb2.GenerateRequest) -> None:
    """A request the coordinator takes (its limits, then its checks) is one its samplers take, as
    the engine sends it to them."""
    servicer = coordinator()
    servicer.limits.check_generate(request)
    req, _ = servicer._new_request(request)
    try:
        spec = req.sampler_sequence()
    except (TypeError, ValueError) as e:  # the engine refuses these at submit, with INVALID_ARGUMENT
        raise InvalidArgumentError(str(e)) from None
    try:
        model_sampler()._state(0, spec)
    except InvalidArgumentError as e:
        raise AssertionError(f"the coordinator took a request its samplers refuse: {e}") from None


TARGETS: dict[str, Target] = {
    "codec": Target(tensor_pb2.Tensor, check_tensor),
    "activation_frames": Target(stage_worker_pb2.ActivationFrame, check_activation_frame, lambda: stage(1, 2)),
    "logits_frames": Target(cpu_sampler_pb2.LogitsFrame, check_logits_frame, sampler),
    "step_plans": Target(stage_worker_pb2.StepPlan, check_step_plan, lambda: [stage(0, 1), stage(0, 2), stage(1, 2)]),
    "generate_requests": Target(coordinator_pb2.GenerateRequest, check_generate_request,
                                lambda: (coordinator(), model_sampler())),
}
