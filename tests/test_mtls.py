"""Mutual TLS: a cluster whose services admit only certificates the cluster's CA signed."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster import start_cluster
from pki import make_pki
from tandem.client import TandemClient
from tandem.client.errors import ClientError
from tandem.core.errors import ConfigError
from tandem.core.wire.tls import TlsConfig
from tandem.v1 import (
    cpu_sampler_pb2,
    cpu_sampler_pb2_grpc,
    kv_store_pb2,
    kv_store_pb2_grpc,
    stage_worker_pb2,
    stage_worker_pb2_grpc,
)

PROMPTS = [[5, 7, 9, 11, 13, 200, 3], [100, 4, 40], list(range(20, 47))]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, dict[str, Path]]:
    directory = tmp_path_factory.mktemp("pki")
    return {"cluster": make_pki(directory, "cluster"), "rogue": make_pki(directory, "rogue")}


@pytest.fixture(scope="module")
def llama(checkpoint):
    return checkpoint("llama")


@pytest.fixture(scope="module")
def secure(llama, pki):
    files = pki["cluster"]
    c = start_cluster(llama, num_stages=2, num_samplers=2,
                      tls=TlsConfig(cert_file=str(files["cert"]), key_file=str(files["key"]), ca_file=str(files["ca"])))
    yield c
    c.stop()


def greedy(endpoint: str, **client_options) -> list[list[int]]:
    with TandemClient(endpoint, timeout_s=120, **client_options) as client:
        return [list(client.generate(prompt_ids=p, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True).token_ids)
                for p in PROMPTS]


def test_tls_cluster_serves_what_a_plaintext_one_does(llama, secure, pki):
    plain = start_cluster(llama, num_stages=2, num_samplers=2)
    try:
        expected = greedy(plain.endpoint)
    finally:
        plain.stop()
    assert greedy(secure.endpoint, root_certificates=pki["cluster"]["ca"].read_bytes()) == expected


def _internal_calls(cluster):
    """(address, call(channel)): the Info RPC of every internal service, each followed by its streams."""
    stage, sampler = cluster.stages[0], cluster.samplers[0]
    return [
        (stage, lambda ch: stage_worker_pb2_grpc.StageWorkerStub(ch).GetStageInfo(
            stage_worker_pb2.GetStageInfoRequest(), timeout=5)),
        (stage, lambda ch: list(stage_worker_pb2_grpc.StageWorkerStub(ch).Steps(iter([]), timeout=5))),
        (sampler, lambda ch: cpu_sampler_pb2_grpc.CpuSamplerStub(ch).GetSamplerInfo(
            cpu_sampler_pb2.GetSamplerInfoRequest(), timeout=5)),
        (sampler, lambda ch: list(cpu_sampler_pb2_grpc.CpuSamplerStub(ch).Results(
            cpu_sampler_pb2.ResultsRequest(), timeout=5))),
        (cluster.kv_store, lambda ch: kv_store_pb2_grpc.KvStoreStub(ch).GetKvStoreInfo(
            kv_store_pb2.GetKvStoreInfoRequest(), timeout=5)),
    ]


def _strangers(pki):
    cluster, rogue = pki["cluster"], pki["rogue"]
    ca = cluster["ca"].read_bytes()
    return {
        "plaintext": None,
        "no client certificate": grpc.ssl_channel_credentials(ca),
        "a rogue CA's certificate": grpc.ssl_channel_credentials(ca, rogue["key"].read_bytes(),
                                                                 rogue["cert"].read_bytes()),
    }


def test_every_internal_service_refuses_strangers(secure, pki):
    for who, credentials in _strangers(pki).items():
        for address, call in _internal_calls(secure):
            channel = (grpc.insecure_channel(address) if credentials is None
                       else grpc.secure_channel(address, credentials))
            with channel, pytest.raises(grpc.RpcError) as refused:
                call(channel)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, (who, address)


def test_a_member_of_the_cluster_is_admitted(secure, pki):
    files = pki["cluster"]
    credentials = grpc.ssl_channel_credentials(files["ca"].read_bytes(), files["key"].read_bytes(),
                                               files["cert"].read_bytes())
    for address, call in _internal_calls(secure)[::2]:  # the Info RPCs
        with grpc.secure_channel(address, credentials) as channel:
            call(channel)


def test_health_answers_on_the_plaintext_health_port(secure):
    assert set(secure.health) == {*secure.stages, *secure.samplers, secure.kv_store, secure.endpoint}
    for address, health_address in secure.health.items():
        assert health_address != address
        with grpc.insecure_channel(health_address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_public_port_needs_the_ca_but_no_client_certificate(secure, pki):
    with TandemClient(secure.endpoint, root_certificates=pki["cluster"]["ca"].read_bytes()) as client:
        assert len(client.server_info().stages) == 2
    with TandemClient(secure.endpoint, root_certificates=pki["rogue"]["ca"].read_bytes(), timeout_s=5) as client:
        with pytest.raises(ClientError):
            client.server_info()


@pytest.mark.parametrize("missing", ["cert_file", "key_file", "ca_file"])
def test_a_partial_tls_config_names_the_missing_field(missing):
    files = {"cert_file": "a.crt", "key_file": "a.key", "ca_file": "ca.crt"}
    del files[missing]
    with pytest.raises(ConfigError, match=f"tls.{missing}"):
        TlsConfig(**files)
