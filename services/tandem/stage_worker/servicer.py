"""The StageWorker gRPC service: thin adapters from protobuf to a StageRunner, and `serve`."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import grpc

from tandem.core import tracing
from tandem.core.cpus import current_placement, parse_cpu_list, place_process
from tandem.core.errors import InvalidArgumentError
from tandem.core.metrics import Metrics
from tandem.core.wire import frames
from tandem.core.wire.server import Server
from tandem.core.wire.tls import Credentials
from tandem.stage_worker.config import StageWorkerConfig
from tandem.stage_worker.peers import GrpcPeers
from tandem.stage_worker.ports import Sample
from tandem.stage_worker.runner import StageRunner
from tandem.stage_worker.samplers import open_directory
from tandem.v1 import stage_worker_pb2 as pb
from tandem.v1 import stage_worker_pb2_grpc as pb_grpc

SERVICE_NAME = "tandem.v1.StageWorker"
# Another service the stage's server also hosts: (add_*Servicer_to_server, servicer, service names)
Hosted = tuple[Callable, object, Iterable[str]]


class StageWorkerServicer(pb_grpc.StageWorkerServicer):
    def __init__(self, runner: StageRunner):
        self.runner = runner

    def Steps(self, request_iterator: Iterator[pb.StepPlan], context: grpc.ServicerContext) -> Iterator[pb.StepDone]:
        done, epoch = self.runner.open_steps()
        ended = threading.Event()

        def read() -> None:
            try:
                for plan in request_iterator:
                    self.runner.submit(plan, epoch)
            except InvalidArgumentError:
                pass  # a message that does not parse: the call ends with INVALID_ARGUMENT (core.interceptors)
            except grpc.RpcError:
                pass  # the coordinator's stream broke or was cancelled: it opens a new one when it can
            finally:
                ended.set()  # the coordinator closed this stream (it opened a newer one, or left)

        threading.Thread(target=read, name="stage-plans", daemon=True).start()
        while context.is_active() and not ended.is_set() and not self.runner.is_stopping:
            try:
                yield done.get(timeout=0.2)
            except queue.Empty:
                continue

    def Activations(self, request_iterator: Iterator[pb.ActivationFrame], context: grpc.ServicerContext
                    ) -> pb.ActivationsSummary:
        """Frames carry a whole Tensor each, or (structure-aware) a header frame holds the layout
        and later frames only raw bytes, shaped by the step's plan when the step runs."""
        executor = self.runner.ready()
        reader = frames.ActivationReader(executor.dtype, executor.model_config.hidden_size)
        num_frames = 0
        for frame in request_iterator:
            arrived = reader.read(frame)
            if arrived is not None:  # not the layout frame
                self.runner.arrive(frame.step_id, arrived)
                num_frames += 1
        return pb.ActivationsSummary(num_frames=num_frames)

    def Tokens(self, request: pb.TokensRequest, context: grpc.ServicerContext) -> Iterator[pb.SampledTokens]:
        r = self.runner
        if r.config.stage_index != r.config.num_stages - 1:
            raise InvalidArgumentError(f"stage {r.config.stage_index} is not the last stage: it samples no tokens")
        follower = r.token_feed.subscribe()
        try:
            if not context.add_callback(follower.close):  # runs on cancel or server stop
                return
            yield from follower.messages()
        finally:
            r.token_feed.unsubscribe(follower)

    def GetStageInfo(self, request: pb.GetStageInfoRequest, context: grpc.ServicerContext) -> pb.GetStageInfoResponse:
        r, e, c = self.runner, self.runner.ready(), self.runner.config
        placement = current_placement()
        return pb.GetStageInfoResponse(
            index=c.stage_index, layer_start=e.layers.start, layer_end=e.layers.end,
            num_layers=e.layers.num_layers, kv_blocks_total=c.num_blocks, kv_blocks_used=e.num_blocks_used,
            block_size=c.block_size, num_sequences=len(e.blocks_of), dtype=str(e.dtype).removeprefix("torch."),
            device=e.device.type, num_steps_total=e.num_steps, uptime_ns=time.perf_counter_ns() - r.ready_ns,
            busy_ns_total=r.busy_ns_total, wait_ns_total=r.wait_ns_total,
            compute_ns_total=r.compute_ns_total, compute_cpu_ns_total=r.compute_cpu_ns_total,
            num_threads=placement.num_threads, num_interop_threads=placement.num_interop_threads,
            cpus=placement.cpus, profile_json=r.profile_json, model_config_sha256=r.model_config_sha256,
            structured_streams=c.structured_streams, sample_on_stage=r.sample is not None,
            follows_tokens=r.follows_tokens,
            **r.peers.traffic(),
        )


def serve(config: StageWorkerConfig, sample: Sample | None = None, hosted: Iterable[Hosted] = (),
          metrics: Metrics | None = None) -> Server:
    """Take the stage's cores, load the stage, start its server (and its metrics on
    config.metrics_port) and mark it ready.

    A last stage given `sample` samples in-process the rows of the sampler it hosts (every row,
    unless its config also names sampler replicas); `hosted` are services its server serves too
    (both: the stage's own sampler, wired by tandem.compose). `metrics` defaults to a
    fresh registry; pass one to share it with a hosted service or to observe it (`metrics.port`).
    """
    place_process(parse_cpu_list(config.cpus), config.num_threads, f"stage-worker {config.stage_index}")
    tracing.configure(config.tracing_endpoint, f"tandem-stage-worker-{config.stage_index}")
    credentials = Credentials.load(config.tls)
    server = Server(config.host, config.port, config.max_workers, credentials=credentials,
                    health_port=config.tls.health_port)
    is_last = config.stage_index == config.num_stages - 1
    samplers = open_directory(config) if is_last and (sample is None or config.has_sampler_replicas) else None
    runner = StageRunner(config, GrpcPeers(config, credentials), sample, metrics, samplers)
    server.add(pb_grpc.add_StageWorkerServicer_to_server, StageWorkerServicer(runner), [SERVICE_NAME])
    for register, servicer, names in hosted:
        server.add(register, servicer, names)
    runner.metrics.serve(config.host, config.metrics_port)
    server.on_stop(runner.metrics.stop)
    server.on_stop(runner.close)
    if samplers is not None:
        samplers.start()
        server.on_stop(samplers.stop)
    server.start()  # liveness answers while the weights load; readiness waits for them
    runner.load()
    server.set_ready()
    return server
