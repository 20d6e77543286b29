"""The CpuSampler gRPC service: thin adapters from protobuf to a SamplerRunner, and `serve`."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import grpc

from tandem.core import tracing
from tandem.core.cpus import current_placement, parse_cpu_list, place_process
from tandem.core.wire.server import Server
from tandem.core.wire.tls import Credentials
from tandem.cpu_sampler.config import SamplerConfig
from tandem.cpu_sampler.runner import SamplerRunner
from tandem.v1 import cpu_sampler_pb2 as pb
from tandem.v1 import cpu_sampler_pb2_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CpuSampler"].full_name  # tandem.v1.CpuSampler


class CpuSamplerServicer(cpu_sampler_pb2_grpc.CpuSamplerServicer):
    def __init__(self, runner: SamplerRunner):
        self.runner = runner

    def AddSequences(self, request: pb.AddSequencesRequest, context: grpc.ServicerContext
                     ) -> pb.AddSequencesResponse:
        self.runner.add(request.sequences)
        return pb.AddSequencesResponse()

    def ReleaseSequences(self, request: pb.ReleaseSequencesRequest, context: grpc.ServicerContext
                         ) -> pb.ReleaseSequencesResponse:
        self.runner.release(request.request_ids)
        return pb.ReleaseSequencesResponse()

    def Plans(self, request_iterator: Iterator[pb.SamplePlan], context: grpc.ServicerContext) -> pb.PlansSummary:
        num_plans = 0
        for plan in request_iterator:
            self.runner.put_plan(plan)
            num_plans += 1
        return pb.PlansSummary(num_plans=num_plans)

    def AttachLogitsRing(self, request: pb.AttachLogitsRingRequest, context: grpc.ServicerContext
                         ) -> pb.AttachLogitsRingResponse:
        self.runner.attach_ring(request.ring_id, request.path, request.nonce, request.slots, request.slot_bytes)
        return pb.AttachLogitsRingResponse()

    def Logits(self, request_iterator: Iterator[pb.LogitsFrame], context: grpc.ServicerContext) -> pb.LogitsSummary:
        return pb.LogitsSummary(num_frames=self.runner.take_logits(request_iterator))

    def Results(self, request: pb.ResultsRequest, context: grpc.ServicerContext) -> Iterator[pb.SampledBatch]:
        subscriber = self.runner.subscribers.subscribe()
        try:
            if not context.add_callback(subscriber.close):  # runs on cancel or server stop
                return  # the RPC already ended
            yield pb.SampledBatch(step_id=0)  # confirms the subscription: from here on, no batch is missed
            yield from subscriber.batches()
        finally:
            self.runner.subscribers.unsubscribe(subscriber)

    def GetSamplerInfo(self, request: pb.GetSamplerInfoRequest, context: grpc.ServicerContext
                       ) -> pb.GetSamplerInfoResponse:
        r, placement = self.runner, current_placement()
        return pb.GetSamplerInfoResponse(
            num_sequences=r.engine.num_sequences, num_frames_total=r.engine.num_frames_total,
            num_rows_total=r.engine.num_rows_total, sample_ns_total=r.sample_ns_total,
            wire_bytes_in_total=r.wire_bytes_in_total, tensor_bytes_in_total=r.tensor_bytes_in_total,
            sample_cpu_ns_total=r.sample_cpu_ns_total, shm_bytes_in_total=r.shm_bytes_in_total,
            torch_threads=placement.num_threads, num_threads=r.config.num_threads,
            num_interop_threads=placement.num_interop_threads, cpus=placement.cpus,
        )


def serve(config: SamplerConfig, runner: SamplerRunner | None = None) -> Server:
    """Start a replica on config.host:config.port, its metrics on config.metrics_port, and mark it
    ready; the caller stops it.

    `runner` defaults to a fresh SamplerRunner(config) whose metrics are labelled `sampler=HOST:PORT`
    (this host's name, the gRPC port); pass one to observe it (its state, `runner.metrics.port`).
    """
    config.validate()
    place_process(parse_cpu_list(config.cpus), config.torch_threads, "cpu-sampler")
    tracing.configure(config.tracing_endpoint, "tandem-cpu-sampler")
    server = Server(config.host, config.port, max_workers=config.max_workers,
                    credentials=Credentials.load(config.tls), health_port=config.tls.health_port)
    runner = runner or SamplerRunner(config, name=f"{socket.gethostname()}:{server.port}")
    server.add(cpu_sampler_pb2_grpc.add_CpuSamplerServicer_to_server, CpuSamplerServicer(runner), [SERVICE_NAME])
    runner.metrics.serve(config.host, config.metrics_port)
    server.on_stop(runner.metrics.stop)
    server.on_stop(runner.close)
    server.start()
    server.set_ready()  # nothing to warm up: no model; state arrives with AddSequences
    return server
