"""The kv-store service: a host-memory KV tier holding the blocks of swapped-out sequences.

`BlockStore` is the gRPC-free store; `serve(config)` runs it behind the KvStore service.
"""

from tandem.kv_store.config import KvStoreConfig
from tandem.kv_store.servicer import SERVICE_NAME, KvStoreServicer, serve
from tandem.kv_store.store import BlockStore, StoreUsage

__all__ = ["SERVICE_NAME", "BlockStore", "KvStoreConfig", "KvStoreServicer", "StoreUsage", "serve"]
