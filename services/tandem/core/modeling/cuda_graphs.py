"""Decode steps of a stage replayed from CUDA graphs.

A decode step launches some forty small kernels per layer. On a GPU, with a few hundred rows
and weights read at terabytes a second, launching them costs more time than running them; a
graph captured once replays the whole stage forward as one launch.

A graph fixes every shape, so shapes are made few by padding: the batch up to the next of
BATCH_SIZES and the context up to the next power of two of blocks. Each step's metadata is
copied into static buffers that every graph reads. Padded rows write their keys and values
into one spare block that no plan names (the cache holds one block more than the stage hands
out) and attend only to it; their outputs are dropped.

With `capture` off (on CPU) the same padded path runs eagerly: that is how a machine without
a GPU tests the padding, which is the part of this that can be wrong.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from tandem.core.modeling.attention import AttentionMetadata
from tandem.core.modeling.kv_cache import PagedKVCache
from tandem.core.modeling.model import StageModel

log = logging.getLogger(__name__)
# One capture at a time in a process: entering a capture synchronizes the whole device, which a
# capture under way in another thread (two stages in one process) does not allow.
_CAPTURE_LOCK = threading.Lock()

BATCH_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


@dataclass
class _Graph:
    meta: AttentionMetadata  # views of the static buffers, at this graph's padded shape
    graph: torch.cuda.CUDAGraph | None = None  # None: replayed eagerly (capture off)
    output: torch.Tensor | None = None  # [batch, hidden], written by each replay


class DecodeGraphs:
    """Runs decode steps of `model` over `cache` through one graph per padded shape.

    The last block of `cache` is the spare one; the caller never hands it out. A step's output
    is a view of the graph's output buffer, valid until the next `run`.
    """

    def __init__(self, model: StageModel, cache: PagedKVCache, max_batch: int, max_context: int,
                 capture: bool = True):
        self.model, self.cache, self.capture = model, cache, capture
        self.block_size = bs = cache.block_size
        self.spare_block = cache.num_blocks - 1
        self.max_batch, self.max_blocks = max_batch, -(-max_context // bs)
        self.batch_sizes = [b for b in BATCH_SIZES if b < max_batch] + [max_batch]
        device, dtype = cache.data.device, cache.data.dtype
        self.inputs = (torch.zeros(max_batch, dtype=torch.int64, device=device) if model.embed_tokens is not None
                       else torch.zeros(max_batch, model.config.hidden_size, dtype=dtype, device=device))
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.slots = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.tables = torch.zeros(max_batch * self.max_blocks, dtype=torch.int64, device=device)
        self.bias = torch.zeros(max_batch * self.max_blocks * bs, dtype=torch.float32, device=device)
        self.rows = torch.arange(max_batch, device=device)
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.num_replays = 0
        self._pool = torch.cuda.graph_pool_handle() if capture else None

    def shape_for(self, meta: AttentionMetadata) -> tuple[int, int] | None:
        """(padded batch, padded blocks) of a step, or None when it does not run from a graph."""
        if not meta.is_decode or meta.num_seqs > self.max_batch:
            return None
        blocks = meta.max_blocks
        if blocks > self.max_blocks:
            return None
        batch = next(b for b in self.batch_sizes if b >= meta.num_seqs)
        return batch, min(1 << (blocks - 1).bit_length(), self.max_blocks)

    @torch.inference_mode()
    def run(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor | None:
        """The stage's hidden states [B, hidden] for decode step `meta`, or None when the step
        is not a decode step that fits (the caller runs it eagerly)."""
        shape = self.shape_for(meta)
        if shape is None:
            return None
        entry = self.graphs.get(shape) or self._capture(shape)
        self._fill(shape, x, meta)
        if entry.graph is not None:
            entry.graph.replay()
        else:
            entry.output = self.model(self.inputs[: shape[0]], entry.meta, self.cache)
        self.num_replays += 1
        return entry.output[: meta.num_seqs]

    def _views(self, batch: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        tables = self.tables[: batch * blocks].view(batch, blocks)
        bias = self.bias[: batch * blocks * self.block_size].view(batch, blocks * self.block_size)
        return tables, bias

    def _pad(self, shape: tuple[int, int], num_real: int) -> None:
        """Rows num_real.. of the static buffers as padding: the spare block, position 0."""
        batch, blocks = shape
        tables, bias = self._views(batch, blocks)
        tables[num_real:].fill_(self.spare_block)
        bias[num_real:].fill_(float("-inf"))
        bias[num_real:, 0] = 0.0
        self.positions[num_real:batch].zero_()
        self.slots[num_real:batch].fill_(self.spare_block * self.block_size)

    def _fill(self, shape: tuple[int, int], x: torch.Tensor, meta: AttentionMetadata) -> None:
        b, blocks, key_bias = meta.num_seqs, meta.max_blocks, meta.gather_key_bias
        tables, bias = self._views(*shape)
        self.inputs[:b].copy_(x)  # padded rows keep earlier inputs: finite, and their outputs are dropped
        self.positions[:b].copy_(meta.positions)
        self.slots[:b].copy_(meta.slot_mapping)
        tables[:b, :blocks].copy_(meta.block_tables.view(b, blocks))
        tables[:b, blocks:].fill_(self.spare_block)
        bias[:b, : key_bias.shape[1]].copy_(key_bias)
        bias[:b, key_bias.shape[1] :].fill_(float("-inf"))
        self._pad(shape, b)

    def _capture(self, shape: tuple[int, int]) -> _Graph:
        batch, blocks = shape
        tables, bias = self._views(batch, blocks)
        meta = AttentionMetadata(positions=self.positions[:batch], slot_mapping=self.slots[:batch],
                                 last_token_indices=self.rows[:batch], max_query_len=1, block_size=self.block_size,
                                 num_seqs=batch, block_tables=tables.view(-1), key_bias=bias)
        entry = self.graphs[shape] = _Graph(meta)
        if not self.capture:
            return entry
        try:
            with _CAPTURE_LOCK:
                self._record(entry, shape)
        except RuntimeError as e:  # this shape runs eagerly (entry.graph None) rather than failing steps
            entry.graph = None
            log.warning("decode steps of shape %s run without a CUDA graph: capture failed: %s", shape, e)
        return entry

    def _record(self, entry: _Graph, shape: tuple[int, int]) -> None:
        batch = shape[0]
        self._pad(shape, 0)  # warm-up and capture see only padding: they write nothing but the spare block
        side = torch.cuda.Stream(self.inputs.device)
        side.wait_stream(torch.cuda.current_stream(self.inputs.device))
        with torch.cuda.stream(side):  # the first run of a shape sets up the libraries' handles off the graph
            self.model(self.inputs[:batch], entry.meta, self.cache)
        torch.cuda.current_stream(self.inputs.device).wait_stream(side)
        entry.graph = torch.cuda.CUDAGraph()
        # thread_local: the stage's input-preparing thread goes on copying on its own stream meanwhile
        with torch.cuda.graph(entry.graph, pool=self._pool, capture_error_mode="thread_local"):
            entry.output = self.model(self.inputs[:batch], entry.meta, self.cache)
