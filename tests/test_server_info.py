"""GetServerInfo gives any caller counts, states and indices, and internal addresses only to the
admin key: the public API does not hand out where the stages and samplers listen."""

from __future__ import annotations

import time

import grpc
import pytest

from cluster import start_cluster
from tandem.client import TandemClient
from tandem.client.errors import PermissionDeniedError, UnauthenticatedError
from tandem.core.wire.interceptors import ApiKeyInterceptor, carries_key
from tandem.v1 import coordinator_pb2, coordinator_pb2_grpc

API_KEY_ENV, ADMIN_KEY_ENV = "TANDEM_TEST_INFO_API_KEY", "TANDEM_TEST_INFO_ADMIN_KEY"
API_KEY, ADMIN_KEY = "user-key", "admin-key"


@pytest.fixture(scope="module")
def cluster(checkpoint):
    with pytest.MonkeyPatch.context() as env:
        env.setenv(API_KEY_ENV, API_KEY)
        env.setenv(ADMIN_KEY_ENV, ADMIN_KEY)
        c = start_cluster(checkpoint("llama"), num_stages=2, num_samplers=2, with_kv_store=False,
                          api_key_env=API_KEY_ENV, admin_key_env=ADMIN_KEY_ENV)
    yield c
    c.stop()


def test_no_caller_but_the_admin_key_gets_internal_addresses(cluster):
    with TandemClient(cluster.endpoint, api_key=API_KEY, timeout_s=30) as client:
        deadline = time.monotonic() + 30
        # the two replicas and the sampler the last stage hosts for argmax rows (preset full); each
        # joins the pool once its Results subscription is confirmed
        while len((info := client.server_info()).samplers) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [(s.index, s.address) for s in info.stages] == [(0, ""), (1, "")]
        assert info.stages[0].layer_start == 0 and info.stages[0].layer_end == info.stages[1].layer_start
        assert sorted(s.index for s in info.samplers) == [0, 1, 2] and {s.address for s in info.samplers} == {""}
        with pytest.raises(PermissionDeniedError, match="admin key"):
            client.server_info(include_addresses=True)
    with TandemClient(cluster.endpoint, api_key=ADMIN_KEY, timeout_s=30) as admin:
        info = admin.server_info(include_addresses=True)
        assert [s.address for s in info.stages] == cluster.stages
        assert {s.address for s in info.samplers} == {*cluster.samplers, cluster.stages[-1]}
        assert [s.address for s in admin.server_info().stages] == ["", ""]  # only when asked for
        assert admin.tokenize("hi")  # the admin key passes wherever the API key does
    with TandemClient(cluster.endpoint, api_key="wrong", timeout_s=30) as stranger:
        with pytest.raises(UnauthenticatedError):
            stranger.server_info()


def test_two_authorization_headers_never_carry_a_key():
    assert carries_key([("authorization", "Bearer k")], "k")
    assert not carries_key([("authorization", "Bearer k"), ("authorization", "Bearer k")], "k")
    assert not carries_key([("authorization", "Bearer ")], "")  # no key configured: nobody holds it
    assert not carries_key([("authorization", "Bearer other")], "k")
    assert ApiKeyInterceptor("k", "")._keys == ["k"]


def test_without_an_admin_key_configured_no_caller_gets_addresses(checkpoint, monkeypatch):
    monkeypatch.delenv("TANDEM_TEST_NO_ADMIN_KEY", raising=False)
    c = start_cluster(checkpoint("llama"), num_stages=1, num_samplers=1, with_kv_store=False,
                      admin_key_env="TANDEM_TEST_NO_ADMIN_KEY")
    try:
        with TandemClient(c.endpoint, api_key="", timeout_s=30) as client:
            with pytest.raises(PermissionDeniedError):
                client.server_info(include_addresses=True)
        with grpc.insecure_channel(c.endpoint) as channel:  # an empty bearer token is no key either
            with pytest.raises(grpc.RpcError) as info:
                coordinator_pb2_grpc.CoordinatorStub(channel).GetServerInfo(
                    coordinator_pb2.GetServerInfoRequest(include_addresses=True), timeout=30,
                    metadata=[("authorization", "Bearer ")])
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        c.stop()
