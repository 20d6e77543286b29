"""A stage's gRPC clients: the next stage, the samplers its logits go to, the KV store."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import grpc
import torch

from tandem.core.wire import codec
from tandem.core.wire.server import CHANNEL_OPTIONS
from tandem.core.wire.tls import Credentials, open_channel
from tandem.stage_worker.config import StageWorkerConfig
from tandem.stage_worker.executor import StageExecutor
from tandem.stage_worker.outputs import ActivationStream, LogitsStream, RingOptions, Traffic
from tandem.v1 import cpu_sampler_pb2_grpc, kv_store_pb2, kv_store_pb2_grpc
from tandem.v1 import stage_worker_pb2 as pb
from tandem.v1 import stage_worker_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
FOLLOW_RETRY_S = 0.1  # between attempts to follow the last stage's Tokens stream


class GrpcPeers:
    """The StagePeers (stage_worker.ports) over gRPC; a sampler's stream opens on its first logits."""

    def __init__(self, config: StageWorkerConfig, credentials: Credentials | None = None):
        self.config, self._credentials = config, credentials
        self._channels: list[grpc.Channel] = []
        self._kv = kv_store_pb2_grpc.KvStoreStub(self._channel(config.kv_store)) if config.kv_store else None
        self.has_kv_store = self._kv is not None
        self._next: ActivationStream | None = None  # set by connect() on every stage but the last
        self._samplers: dict[str, LogitsStream] = {}
        self._vocab_size = 0  # set by connect()
        self._closed = threading.Event()
        self._tokens_call: grpc.Future | None = None
        self.follows_tokens = threading.Event()  # set while stage 0 follows the last stage's Tokens stream

    def connect(self, executor: StageExecutor) -> None:
        c = self.config
        self._vocab_size = executor.model_config.vocab_size
        if c.next_stage:
            stub = pb_grpc.StageWorkerStub(self._channel(c.next_stage))
            layout = codec.layout(executor.dtype, [executor.model_config.hidden_size])
            self._next = ActivationStream(stub, f"activations->{c.next_stage}", layout, c.structured_streams)

    def follow_tokens(self, on_tokens: Callable[[int, Sequence[str], Sequence[int]], None]) -> None:
        """Stage 0: follow the last stage's Tokens stream in a thread of its own, subscribing again
        whenever it breaks; `on_tokens(step_id, request_ids, token_ids)` gets each step's."""
        stub = pb_grpc.StageWorkerStub(self._channel(self.config.last_stage))

        def follow() -> None:
            while not self._closed.is_set():
                try:
                    self._tokens_call = stub.Tokens(pb.TokensRequest())
                    for message in self._tokens_call:
                        if message.step_id == 0:  # the subscription holds from here on
                            self.follows_tokens.set()
                        else:
                            on_tokens(message.step_id, message.request_ids, message.token_ids)
                except grpc.RpcError as e:
                    if not self._closed.is_set() and self.follows_tokens.is_set():
                        log.warning("the last stage's Tokens stream broke: %s %s", e.code().name, e.details())
                self.follows_tokens.clear()
                self._closed.wait(FOLLOW_RETRY_S)

        threading.Thread(target=follow, name=f"tokens<-{self.config.last_stage}", daemon=True).start()

    def send_hidden(self, step_id: int, hidden: torch.Tensor) -> None:
        assert self._next is not None, "only the last stage has no next stage, and it sends logits"
        self._next.send(step_id, hidden)

    def send_logits(self, address: str, step_id: int, request_ids: Sequence[str], sample_indices: Sequence[int],
                    logits: torch.Tensor) -> None:
        if address not in self._samplers:
            c = self.config
            ring = None
            if c.shared_memory_logits:
                ring = RingOptions(c.logits_ring_slots, c.logits_ring_mib * 2**20 // c.logits_ring_slots,
                                   c.logits_ring_wait_s)
            stub = cpu_sampler_pb2_grpc.CpuSamplerStub(self._channel(address))
            self._samplers[address] = LogitsStream(stub, address, self._vocab_size, c.structured_streams, ring)
        self._samplers[address].send(step_id, request_ids, sample_indices, logits)

    def put_blocks(self, request_id: str, blocks: torch.Tensor) -> None:
        req = kv_store_pb2.PutBlocksRequest(request_id=request_id, stage=self.config.stage_index,
                                            blocks=codec.encode(blocks))
        self._kv.PutBlocks(req, timeout=60)

    def get_blocks(self, request_id: str) -> torch.Tensor:
        req = kv_store_pb2.GetBlocksRequest(request_id=request_id, stage=self.config.stage_index)
        return codec.decode(self._kv.GetBlocks(req, timeout=60).blocks)

    def traffic(self) -> dict[str, int]:
        hops = self.hops().values()
        return {
            "frames_out_total": sum(t.frames for t in hops),
            "wire_bytes_out_total": sum(t.wire_bytes for t in hops),
            "tensor_bytes_out_total": sum(t.tensor_bytes for t in hops),
            "shm_bytes_out_total": sum(t.shm_bytes for t in hops),
        }

    def hops(self) -> dict[str, Traffic]:
        return {stream.name: stream.traffic for stream in self._streams()}

    def close(self) -> None:
        self._closed.set()
        if self._tokens_call is not None:
            self._tokens_call.cancel()
        for stream in self._streams():
            stream.close()
        for channel in self._channels:
            channel.close()

    def _streams(self) -> list[ActivationStream | LogitsStream]:
        return [*self._samplers.values(), *([self._next] if self._next is not None else [])]

    def _channel(self, address: str) -> grpc.Channel:
        channel = open_channel(address, self._credentials, CHANNEL_OPTIONS)
        self._channels.append(channel)
        return channel
