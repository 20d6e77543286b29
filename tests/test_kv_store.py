"""The kv-store: BlockStore on its own, then the KvStore service on a real server on port 0."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.core.config import load_config
from tandem.core.errors import ConfigError, InvalidArgumentError, NotFoundError, ResourceExhaustedError
from tandem.core.wire.codec import decode, encode
from tandem.kv_store import SERVICE_NAME, BlockStore, KvStoreConfig, serve
from tandem.v1 import kv_store_pb2, kv_store_pb2_grpc, tensor_pb2

# [num_blocks, layers, 2, block_size, kv_heads, head_dim]
SHAPE = (3, 2, 2, 4, 2, 5)


def blocks(dtype: torch.dtype = torch.float32, seed: int = 0, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype)


NBYTES = blocks().nbytes  # 960


# --- BlockStore ------------------------------------------------------------------------


def test_put_get_drops_by_default() -> None:
    store = BlockStore(10 * NBYTES)
    t = blocks()
    store.put("a", 1, t)
    assert ("a", 1) in store and store.usage().used_bytes == NBYTES
    assert store.get("a", 1) is t
    assert ("a", 1) not in store
    assert store.usage().used_bytes == 0 and store.usage().num_requests == 0


def test_get_keep_leaves_blocks() -> None:
    store = BlockStore(10 * NBYTES)
    store.put("a", 0, blocks())
    assert torch.equal(store.get("a", 0, keep=True), blocks())
    assert store.usage().used_bytes == NBYTES
    assert torch.equal(store.get("a", 0), blocks())


def test_capacity() -> None:
    store = BlockStore(2 * NBYTES)
    store.put("a", 0, blocks())
    store.put("a", 1, blocks())
    with pytest.raises(ResourceExhaustedError, match=f"needs {NBYTES} bytes, 0 of {2 * NBYTES}"):
        store.put("b", 0, blocks())
    usage = store.usage()
    assert (usage.used_bytes, usage.free_bytes, usage.num_requests, usage.num_entries) == (2 * NBYTES, 0, 1, 2)
    store.get("a", 0)
    store.put("b", 0, blocks())  # room again


def test_duplicate_is_rejected_and_keeps_the_first() -> None:
    store = BlockStore(10 * NBYTES)
    store.put("a", 0, blocks(seed=1))
    with pytest.raises(InvalidArgumentError, match="'a' already has blocks on stage 0"):
        store.put("a", 0, blocks(seed=2))
    assert torch.equal(store.get("a", 0), blocks(seed=1))
    assert store.usage().used_bytes == 0


def test_not_found_names_request_and_stage() -> None:
    store = BlockStore(10 * NBYTES)
    store.put("a", 0, blocks())
    with pytest.raises(NotFoundError, match="request 'a' stage 1"):
        store.get("a", 1)
    with pytest.raises(NotFoundError, match="request 'b' stage 0"):
        store.get("b", 0, keep=True)


def test_free_every_stage_and_ignore_unknown() -> None:
    store = BlockStore(10 * NBYTES)
    for stage in range(3):
        store.put("a", stage, blocks())
    store.put("b", 0, blocks())
    assert store.free(["a", "unknown"]) == 3 * NBYTES
    assert store.free(["a"]) == 0
    usage = store.usage()
    assert (usage.used_bytes, usage.num_requests) == (NBYTES, 1)


def test_bad_key_and_layout() -> None:
    store = BlockStore(10 * NBYTES)
    with pytest.raises(InvalidArgumentError, match="request_id is empty"):
        store.put("", 0, blocks())
    with pytest.raises(InvalidArgumentError, match=r"shape \[3, 4\]"):
        store.put("a", 0, torch.zeros(3, 4))
    with pytest.raises(InvalidArgumentError, match="expected"):
        store.put("a", 0, torch.zeros(1, 1, 3, 1, 1, 1))


def test_config() -> None:
    config = load_config(KvStoreConfig, {"capacity_bytes": 1024, "max_workers": 2})
    assert config.capacity_bytes == 1024 and config.host == "127.0.0.1"
    with pytest.raises(ConfigError, match="capacity_bytes"):
        load_config(KvStoreConfig, {"capacity_bytes": -1})
    with pytest.raises(ConfigError, match="capacty"):
        load_config(KvStoreConfig, {"capacty": 1})


# --- the service -----------------------------------------------------------------------


@pytest.fixture
def kv_store() -> Iterator[kv_store_pb2_grpc.KvStoreStub]:
    server = serve(KvStoreConfig(capacity_bytes=3 * NBYTES, max_workers=2))
    channel = grpc.insecure_channel(server.address)
    try:
        yield kv_store_pb2_grpc.KvStoreStub(channel)
    finally:
        channel.close()
        server.stop(0)


def put(stub: kv_store_pb2_grpc.KvStoreStub, request_id: str, stage: int, t: torch.Tensor) -> None:
    stub.PutBlocks(kv_store_pb2.PutBlocksRequest(request_id=request_id, stage=stage, blocks=encode(t)), timeout=10)


def get(stub: kv_store_pb2_grpc.KvStoreStub, request_id: str, stage: int, keep: bool = False) -> torch.Tensor:
    reply = stub.GetBlocks(kv_store_pb2.GetBlocksRequest(request_id=request_id, stage=stage, keep=keep), timeout=10)
    return decode(reply.blocks)


def status_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact(kv_store, dtype: torch.dtype) -> None:
    t = blocks(dtype)
    t.view(-1)[:3] = torch.tensor([float("nan"), float("-inf"), -0.0], dtype=dtype)
    put(kv_store, "r1", 2, t)
    kept = get(kv_store, "r1", 2, keep=True)
    out = get(kv_store, "r1", 2)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    for got in (kept, out):
        assert got.dtype == dtype and got.shape == t.shape
        assert torch.equal(got.view(bits), t.view(bits))
    code, details = status_of(lambda: get(kv_store, "r1", 2))
    assert code == grpc.StatusCode.NOT_FOUND


def test_errors_map_to_status_codes_and_server_keeps_serving(kv_store) -> None:
    for stage in range(3):
        put(kv_store, "full", stage, blocks())
    code, details = status_of(lambda: put(kv_store, "more", 0, blocks()))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"needs {NBYTES} bytes, 0 of {3 * NBYTES} bytes are free" in details

    code, details = status_of(lambda: get(kv_store, "missing", 4))
    assert code == grpc.StatusCode.NOT_FOUND and "request 'missing' stage 4" in details

    code, details = status_of(lambda: put(kv_store, "full", 0, blocks()))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "already has blocks" in details

    bad = tensor_pb2.Tensor(dtype="float32", shape=list(SHAPE), data=bytes(NBYTES - 1))
    request = kv_store_pb2.PutBlocksRequest(request_id="bad", stage=0, blocks=bad)
    code, details = status_of(lambda: kv_store.PutBlocks(request, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and f"payload has {NBYTES - 1} bytes" in details

    freed = kv_store.FreeBlocks(kv_store_pb2.FreeBlocksRequest(request_ids=["full", "nope"]), timeout=10)
    assert freed.freed_bytes == 3 * NBYTES
    put(kv_store, "after", 0, blocks(seed=7))  # still serving, and the room is back
    assert torch.equal(get(kv_store, "after", 0), blocks(seed=7))


def test_info(kv_store) -> None:
    put(kv_store, "a", 0, blocks())
    put(kv_store, "a", 1, blocks())
    put(kv_store, "b", 0, blocks(torch.bfloat16))
    info = kv_store.GetKvStoreInfo(kv_store_pb2.GetKvStoreInfoRequest(), timeout=10)
    assert info.capacity_bytes == 3 * NBYTES
    assert info.used_bytes == 2 * NBYTES + NBYTES // 2
    assert info.num_requests == 2


def test_health_serving() -> None:
    server = serve(KvStoreConfig(capacity_bytes=NBYTES, max_workers=2))
    try:
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", SERVICE_NAME):
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert SERVICE_NAME == "tandem.v1.KvStore"
    finally:
        server.stop(0)
