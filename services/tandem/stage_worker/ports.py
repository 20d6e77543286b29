"""What a StageRunner reaches outside itself: its peers (the next stage, the samplers, the KV store,
the last stage's Tokens stream; stage_worker.peers over gRPC) and, on a last stage that samples
in-process, its sampler (tandem.compose wires a cpu_sampler runner's `sample`)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from tandem.stage_worker.executor import StageExecutor
    from tandem.stage_worker.outputs import Traffic

# Takes a step's sampled (request id, token) pairs, in row order.
OnTokens = Callable[[list[tuple[str, int]]], None]
# (step_id, request_ids, sample_indices, logits [rows, vocab] float32, the step's traceparent,
# a function to give the tokens to before they are published to the coordinator, or None) ->
# (request id, token) of each row it sampled, in row order: sample the rows here
Sample = Callable[[int, Sequence[str], Sequence[int], torch.Tensor, str, OnTokens | None], Sequence[tuple[str, int]]]


class StagePeers(Protocol):
    """Where a stage's outputs go and its swapped blocks live."""

    has_kv_store: bool
    follows_tokens: threading.Event  # stage 0: set while it follows the last stage's Tokens stream

    def connect(self, executor: StageExecutor) -> None:
        """Open the outgoing streams, once the stage is loaded (their layouts need its shapes)."""

    def send_hidden(self, step_id: int, hidden: torch.Tensor) -> None:
        """Queue a step's activations [tokens, hidden] for the next stage."""

    def send_logits(self, address: str, step_id: int, request_ids: Sequence[str], sample_indices: Sequence[int],
                    logits: torch.Tensor) -> None:
        """Queue logits rows [rows, vocab] float32 for the sampler at `address`."""

    def put_blocks(self, request_id: str, blocks: torch.Tensor) -> None: ...

    def follow_tokens(self, on_tokens: Callable[[int, Sequence[str], Sequence[int]], None]) -> None:
        """Stage 0: follow the last stage's Tokens stream (StageWorkerConfig.last_stage), setting
        `follows_tokens` while it holds; each step's tokens go to `on_tokens`."""

    def get_blocks(self, request_id: str) -> torch.Tensor: ...

    def traffic(self) -> dict[str, int]:
        """Frames and bytes sent so far: GetStageInfoResponse's *_out_total fields."""

    def hops(self) -> dict[str, Traffic]:
        """What each outgoing stream sent so far, by the stream's name ("activations->host:port")."""

    def close(self) -> None: ...
