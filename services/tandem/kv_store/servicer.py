"""The KvStore gRPC service: a thin adapter from protobuf to BlockStore, and `serve`."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tandem.core.metrics import PREFIX, Metrics
from tandem.core.wire import codec
from tandem.core.wire.server import Server
from tandem.core.wire.tls import Credentials
from tandem.kv_store.config import KvStoreConfig
from tandem.kv_store.store import BlockStore
from tandem.v1 import kv_store_pb2, kv_store_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = kv_store_pb2.DESCRIPTOR.services_by_name["KvStore"].full_name


class KvStoreServicer(kv_store_pb2_grpc.KvStoreServicer):
    """Serves one BlockStore. Typed errors become status codes in the server's interceptor."""

    def __init__(self, store: BlockStore):
        self.store = store

    def PutBlocks(
        self, request: kv_store_pb2.PutBlocksRequest, context: grpc.ServicerContext
    ) -> kv_store_pb2.PutBlocksResponse:
        # Decoded tensors are read-only views of the message bytes: keep a private copy.
        blocks = codec.decode(request.blocks).clone()
        self.store.put(request.request_id, request.stage, blocks)
        log.debug("put %d bytes for %s stage %d", blocks.nbytes, request.request_id, request.stage)
        return kv_store_pb2.PutBlocksResponse()

    def GetBlocks(
        self, request: kv_store_pb2.GetBlocksRequest, context: grpc.ServicerContext
    ) -> kv_store_pb2.GetBlocksResponse:
        blocks = self.store.get(request.request_id, request.stage, keep=request.keep)
        return kv_store_pb2.GetBlocksResponse(blocks=codec.encode(blocks))

    def FreeBlocks(
        self, request: kv_store_pb2.FreeBlocksRequest, context: grpc.ServicerContext
    ) -> kv_store_pb2.FreeBlocksResponse:
        return kv_store_pb2.FreeBlocksResponse(freed_bytes=self.store.free(request.request_ids))

    def GetKvStoreInfo(
        self, request: kv_store_pb2.GetKvStoreInfoRequest, context: grpc.ServicerContext
    ) -> kv_store_pb2.GetKvStoreInfoResponse:
        usage = self.store.usage()
        return kv_store_pb2.GetKvStoreInfoResponse(
            capacity_bytes=usage.capacity_bytes,
            used_bytes=usage.used_bytes,
            num_requests=usage.num_requests,
        )


class UsageCollector(Collector):
    """The store's figures, read when the metrics endpoint is scraped."""

    def __init__(self, store: BlockStore):
        self.store = store

    def collect(self) -> Iterator[Metric]:
        usage = self.store.usage()
        yield GaugeMetricFamily(PREFIX + "kv_store_used_bytes", "Bytes of KV blocks held.", value=usage.used_bytes)
        yield GaugeMetricFamily(PREFIX + "kv_store_capacity_bytes", "Most bytes of KV blocks the store may hold.",
                                value=usage.capacity_bytes)
        yield GaugeMetricFamily(PREFIX + "kv_store_num_requests", "Swapped-out requests with blocks held.",
                                value=usage.num_requests)


def serve(config: KvStoreConfig, metrics: Metrics | None = None) -> Server:
    """Start a kv-store server for `config` and its metrics on config.metrics_port, mark it ready,
    and return it (call `.stop()`). Pass `metrics` to observe them (`metrics.port`)."""
    server = Server(config.host, config.port, max_workers=config.max_workers,
                    credentials=Credentials.load(config.tls), health_port=config.tls.health_port)
    servicer = KvStoreServicer(BlockStore(config.capacity_bytes))
    server.add(kv_store_pb2_grpc.add_KvStoreServicer_to_server, servicer, [SERVICE_NAME])
    metrics = metrics or Metrics()
    metrics.registry.register(UsageCollector(servicer.store))
    metrics.serve(config.host, config.metrics_port)
    server.on_stop(metrics.stop)
    server.start()
    server.set_ready()
    log.info("kv-store serving on %s with %d bytes of capacity", server.address, config.capacity_bytes)
    return server
