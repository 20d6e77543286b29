"""The StageWorker gRPC service: plans in, activations in, activations or logits out."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from pathlib import Path

import grpc
import torch

from tandem.core import codec
from tandem.core.cpus import current_placement, parse_cpu_list, place_process
from tandem.core.errors import CodecError, InvalidArgumentError, UnavailableError
from tandem.core.profile import BALANCE_CONTEXT, BALANCE_TOKENS, StageProfile
from tandem.core.profiler import measure_profile
from tandem.core.server import CHANNEL_OPTIONS, Server
from tandem.cpu_sampler import servicer as cpu_sampler
from tandem.cpu_sampler.config import SamplerConfig
from tandem.stage_worker.config import StageWorkerConfig
from tandem.stage_worker.executor import StageExecutor
from tandem.stage_worker.inputs import InputPreparer, Prepared
from tandem.stage_worker.outputs import ActivationStream, LogitsStream, RingOptions
from tandem.v1 import cpu_sampler_pb2_grpc, kv_store_pb2, kv_store_pb2_grpc, tensor_pb2
from tandem.v1 import stage_worker_pb2 as pb
from tandem.v1 import stage_worker_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = "tandem.v1.StageWorker"


class StageWorkerServicer(pb_grpc.StageWorkerServicer):
    def __init__(self, config: StageWorkerConfig):
        self.config = config
        self.executor: StageExecutor | None = None  # set by load()
        self._inputs: InputPreparer | None = None  # set by load()
        self._done: queue.Queue[pb.StepDone] = queue.Queue()
        self._activations: dict[int, torch.Tensor | tuple[bytes, tensor_pb2.TensorLayout]] = {}
        self._arrived = threading.Condition()
        self._stopping = False
        self._channels: list[grpc.Channel] = []
        self._next: ActivationStream | None = None  # set by load() on every stage but the last
        self._samplers: dict[str, LogitsStream] = {}
        self._kv = kv_store_pb2_grpc.KvStoreStub(self._channel(config.kv_store)) if config.kv_store else None
        self._ready_ns = 0
        self.local_sampler = None  # a CpuSamplerServicer when config.sample_on_stage
        self.profile: StageProfile | None = None  # measured by load() when config.profile_at_startup
        self._profile_json = ""
        # written by the executor thread only
        self.busy_ns_total = self.wait_ns_total = self.compute_ns_total = self.compute_cpu_ns_total = 0

    def load(self) -> None:
        """Load the stage's weights, measure its profile, and start executing plans."""
        c = self.config
        executor = StageExecutor(c)
        if c.profile_at_startup:
            self.profile = measure_profile(c.model, c.device, c.dtype, config=executor.model_config)
            log.info("stage %d profile in %.1f s: one layer %.2f ms, LM head %.2f ms (%d tokens, context %d)",
                     c.stage_index, self.profile.measure_s, self.profile.layer(BALANCE_TOKENS, BALANCE_CONTEXT),
                     self.profile.head(BALANCE_TOKENS), BALANCE_TOKENS, BALANCE_CONTEXT)
            self._profile_json = self.profile.to_json()
            if c.profile_file:
                Path(c.profile_file).write_text(self._profile_json)
        self.executor = executor
        if self.config.next_stage:
            stub = pb_grpc.StageWorkerStub(self._channel(self.config.next_stage))
            layout = codec.layout(self.executor.dtype, [self.executor.model_config.hidden_size])
            self._next = ActivationStream(stub, f"activations->{self.config.next_stage}", layout,
                                          self.config.structured_streams)
        self._inputs = InputPreparer(lambda plan, slot: self.executor.prepare(plan, slot.buffers),
                                     overlap=self.config.overlap_input_prep)
        self._ready_ns = time.perf_counter_ns()
        threading.Thread(target=self._execute_loop, name="stage-executor", daemon=True).start()

    def _ready(self) -> StageExecutor:
        if self.executor is None:
            raise UnavailableError("stage is still loading its weights")
        return self.executor

    # --- RPCs ---------------------------------------------------------------------------

    def Steps(self, request_iterator, context):
        self._ready()
        done: queue.Queue[pb.StepDone] = queue.Queue()
        self._done = done  # one coordinator stream at a time; the newest wins

        def read():
            for plan in request_iterator:
                self._inputs.submit(plan)

        threading.Thread(target=read, name="stage-plans", daemon=True).start()
        while context.is_active() and not self._stopping:
            try:
                yield done.get(timeout=0.2)
            except queue.Empty:
                continue

    def Activations(self, request_iterator, context):
        """Frames carry a whole Tensor each, or (structure-aware) a header frame holds the layout
        and later frames only raw bytes, shaped by the step's plan when the step runs."""
        self._ready()
        num_frames = 0
        hidden_size = self.executor.model_config.hidden_size
        layout = None
        for frame in request_iterator:
            if frame.HasField("layout"):
                layout = codec.check_layout(frame.layout, self.executor.dtype, [hidden_size])
                continue
            if frame.HasField("hidden"):
                hidden = codec.decode(frame.hidden, expected_dtype=self.executor.dtype)
                if hidden.dim() != 2 or hidden.shape[1] != hidden_size:
                    raise CodecError(f"step {frame.step_id}: activations {list(hidden.shape)}, expected [tokens, {hidden_size}]")
            elif layout is None:
                raise CodecError(f"step {frame.step_id}: raw activations before the stream's layout frame")
            else:
                hidden = (frame.data, layout)
            with self._arrived:
                self._activations[frame.step_id] = hidden
                self._arrived.notify_all()
            num_frames += 1
        return pb.ActivationsSummary(num_frames=num_frames)

    def GetStageInfo(self, request, context):
        e, c = self._ready(), self.config
        placement = current_placement()
        return pb.GetStageInfoResponse(
            index=c.stage_index, layer_start=e.layers.start, layer_end=e.layers.end,
            num_layers=e.layers.num_layers, kv_blocks_total=c.num_blocks, kv_blocks_used=e.num_blocks_used,
            block_size=c.block_size, num_sequences=len(e.blocks_of), dtype=str(e.dtype).removeprefix("torch."),
            device=e.device.type, num_steps_total=e.num_steps, uptime_ns=time.perf_counter_ns() - self._ready_ns,
            busy_ns_total=self.busy_ns_total, wait_ns_total=self.wait_ns_total,
            compute_ns_total=self.compute_ns_total, compute_cpu_ns_total=self.compute_cpu_ns_total,
            num_threads=placement.num_threads, num_interop_threads=placement.num_interop_threads,
            cpus=placement.cpus, profile_json=self._profile_json,
            **self._traffic(),
        )

    def _traffic(self) -> dict[str, int]:
        streams = [s for s in [self._next, *list(self._samplers.values())] if s is not None]
        return {
            "frames_out_total": sum(s.traffic.frames for s in streams),
            "wire_bytes_out_total": sum(s.traffic.wire_bytes for s in streams),
            "tensor_bytes_out_total": sum(s.traffic.tensor_bytes for s in streams),
            "shm_bytes_out_total": sum(s.traffic.shm_bytes for s in streams),
        }

    # --- execution ----------------------------------------------------------------------

    def _execute_loop(self) -> None:
        while (prepared := self._inputs.next()) is not None:
            plan = prepared.plan
            done = pb.StepDone(step_id=plan.step_id)
            start = time.perf_counter_ns()
            try:
                self._execute(prepared, done)
            except Exception as e:  # noqa: BLE001 - reported to the coordinator on the step
                if not isinstance(e, InvalidArgumentError):
                    log.exception("step %d failed", plan.step_id)
                done.error = str(e) or type(e).__name__
            finally:
                self._inputs.release(prepared)  # its outputs are sent: the slot may be reused
            self.busy_ns_total += time.perf_counter_ns() - start - done.wait_ns
            self.wait_ns_total += done.wait_ns
            self.compute_ns_total += done.forward_ns
            self._done.put(done)

    def _execute(self, prepared: Prepared, done: pb.StepDone) -> None:
        ex, plan = self.executor, prepared.plan
        ex.forget(plan.finished_request_ids)
        t0 = time.perf_counter_ns()
        if plan.swap_out or plan.swap_in:
            if self._kv is None:
                raise InvalidArgumentError(f"step {plan.step_id}: plan moves blocks but this stage has no KV store")
            ex.swap_out(plan, self._put_blocks)
            ex.swap_in(plan, self._get_blocks)
        done.swap_ns = time.perf_counter_ns() - t0
        if prepared.error is not None:
            raise prepared.error
        if prepared.inputs is None:  # no sequences: only housekeeping
            return
        t1 = time.perf_counter_ns()
        hidden = None if ex.layers.is_first else self._wait_activations(plan.step_id, prepared.inputs.num_tokens)
        t2, cpu = time.perf_counter_ns(), time.process_time_ns()
        out = ex.run(plan, prepared.inputs, hidden)
        done.wait_ns, done.forward_ns = t2 - t1, time.perf_counter_ns() - t2
        self.compute_cpu_ns_total += time.process_time_ns() - cpu
        if out.hidden is not None:
            self._next.send(plan.step_id, out.hidden)
        else:
            self._send_logits(plan, out.logits)

    def _wait_activations(self, step_id: int, num_tokens: int) -> torch.Tensor | None:
        """The step's activations, shaped by the plan when they came as raw bytes."""
        with self._arrived:
            while step_id not in self._activations and not self._stopping:
                self._arrived.wait(timeout=0.5)
            hidden = self._activations.pop(step_id, None)
        if isinstance(hidden, tuple):
            data, layout = hidden
            try:
                hidden = codec.decode_rows(data, layout, num_tokens)
            except CodecError as e:
                raise InvalidArgumentError(f"step {step_id}: activations do not fit the plan: {e}") from None
        return hidden

    def _send_logits(self, plan: pb.StepPlan, logits: torch.Tensor) -> None:
        if self.local_sampler is not None:  # sample here, in series (baseline)
            self.local_sampler.sample(plan.step_id, [s.request_id for s in plan.sequences],
                                      [s.sample_index for s in plan.sequences], logits)
            return
        rows: dict[str, list[int]] = defaultdict(list)
        for i, s in enumerate(plan.sequences):
            rows[s.sampler].append(i)
        for address, idx in rows.items():
            seqs = [plan.sequences[i] for i in idx]
            rows_logits = logits if len(idx) == len(plan.sequences) else logits[idx]
            self._logits_stream(address).send(plan.step_id, [s.request_id for s in seqs],
                                              [s.sample_index for s in seqs], rows_logits)

    def _logits_stream(self, address: str) -> LogitsStream:
        if address not in self._samplers:
            c = self.config
            ring = None
            if c.shared_memory_logits:
                ring = RingOptions(c.logits_ring_slots, c.logits_ring_mib * 2**20 // c.logits_ring_slots,
                                   c.logits_ring_wait_s)
            stub = cpu_sampler_pb2_grpc.CpuSamplerStub(self._channel(address))
            self._samplers[address] = LogitsStream(stub, address, self.executor.model_config.vocab_size,
                                                   c.structured_streams, ring)
        return self._samplers[address]

    def _put_blocks(self, request_id: str, blocks: torch.Tensor) -> None:
        req = kv_store_pb2.PutBlocksRequest(request_id=request_id, stage=self.config.stage_index, blocks=codec.encode(blocks))
        self._kv.PutBlocks(req, timeout=60)

    def _get_blocks(self, request_id: str) -> torch.Tensor:
        req = kv_store_pb2.GetBlocksRequest(request_id=request_id, stage=self.config.stage_index)
        return codec.decode(self._kv.GetBlocks(req, timeout=60).blocks)

    def _channel(self, address: str) -> grpc.Channel:
        channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._channels.append(channel)
        return channel

    def close(self) -> None:
        self._stopping = True
        if self._inputs is not None:
            self._inputs.close()
        for sender in [self._next, *self._samplers.values()]:
            if sender is not None:
                sender.close()
        for channel in self._channels:
            channel.close()


def serve(config: StageWorkerConfig) -> Server:
    """Take the stage's cores, load the stage, start its server and mark it ready."""
    place_process(parse_cpu_list(config.cpus), config.num_threads, f"stage-worker {config.stage_index}")
    server = Server(config.host, config.port, config.max_workers)
    servicer = StageWorkerServicer(config)
    server.add(pb_grpc.add_StageWorkerServicer_to_server, servicer, [SERVICE_NAME])
    if config.sample_on_stage:
        servicer.local_sampler = cpu_sampler.CpuSamplerServicer(SamplerConfig(fast_sampler=config.fast_sampler))
        server.add(cpu_sampler_pb2_grpc.add_CpuSamplerServicer_to_server, servicer.local_sampler,
                   [cpu_sampler.SERVICE_NAME])
    server.on_stop(servicer.close)
    server.start()  # liveness answers while the weights load; readiness waits for them
    servicer.load()
    server.set_ready()
    return server
