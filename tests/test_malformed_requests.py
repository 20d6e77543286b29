"""Bytes that are not a protobuf message, sent to every RPC of every service: INVALID_ARGUMENT, and
the service goes on serving (gRPC's own answer would be INTERNAL, "Exception deserializing request!")."""

from __future__ import annotations

import base64

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster import start_cluster
from tandem.client import TandemClient
from tandem.v1 import coordinator_pb2, cpu_sampler_pb2, kv_store_pb2, stage_worker_pb2, stage_worker_pb2_grpc

# A varint that never ends, and the input fuzzing first found (a length past the end).
GARBAGE = [b"\xff" * 11, base64.b64decode("Cr+1Sv//SkpBSr+1Sg==")]
SERVICES = {  # role -> (file descriptor, service name)
    "endpoint": (coordinator_pb2.DESCRIPTOR, "Coordinator"),
    "stage": (stage_worker_pb2.DESCRIPTOR, "StageWorker"),
    "sampler": (cpu_sampler_pb2.DESCRIPTOR, "CpuSampler"),
    "kv_store": (kv_store_pb2.DESCRIPTOR, "KvStore"),
}
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]


@pytest.fixture(scope="module")
def cluster(checkpoint):
    c = start_cluster(checkpoint("llama"), num_stages=2, num_samplers=1)
    yield c
    c.stop()


def send_bytes(channel: grpc.Channel, method: MethodDescriptor, data: bytes) -> None:
    """Call `method` with `data` as its serialized request (one message on a stream)."""
    kind = f"{'stream' if method.client_streaming else 'unary'}_{'stream' if method.server_streaming else 'unary'}"
    call = getattr(channel, kind)(f"/{method.containing_service.full_name}/{method.name}",
                                  request_serializer=None, response_deserializer=None)
    response = call(iter([data]) if method.client_streaming else data, timeout=10)
    if method.server_streaming:
        list(response)


def addresses(cluster) -> dict[str, str]:
    return {"endpoint": cluster.endpoint, "stage": cluster.stages[1], "sampler": cluster.samplers[0],
            "kv_store": cluster.kv_store}


def assert_invalid_argument(address: str, methods: list[MethodDescriptor]) -> None:
    with grpc.insecure_channel(address) as channel:
        for method in methods:
            for data in GARBAGE:
                with pytest.raises(grpc.RpcError) as e:
                    send_bytes(channel, method, data)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method.full_name, e.value)
                assert "not a valid protobuf message" in e.value.details(), (method.full_name, e.value)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("role", list(SERVICES))
def test_garbage_bytes_are_invalid_argument_on_every_rpc(cluster, role):
    file, name = SERVICES[role]
    # Steps has a test of its own: a Steps stream takes the stage's coordinator stream over (the newest wins).
    methods = [m for m in [*file.services_by_name[name].methods, *HEALTH.methods] if m.name != "Steps"]
    assert_invalid_argument(addresses(cluster)[role], methods)
    with TandemClient(cluster.endpoint, timeout_s=60) as client:
        assert len(client.generate(prompt_ids=[5, 6], max_tokens=3, ignore_eos=True).token_ids) == 3


def test_garbage_bytes_on_steps(cluster):
    assert_invalid_argument(cluster.stages[1], [SERVICES["stage"][0].services_by_name["StageWorker"].methods_by_name["Steps"]])
    with grpc.insecure_channel(cluster.stages[1]) as channel:
        stub = stage_worker_pb2_grpc.StageWorkerStub(channel)
        assert stub.GetStageInfo(stage_worker_pb2.GetStageInfoRequest(), timeout=10).index == 1
