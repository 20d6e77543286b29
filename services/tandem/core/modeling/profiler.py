"""Measuring a stage profile (tandem.core.modeling.profile) on this process's device, dtype and threads.

Layers of a Llama-family model all have the same shape, so one decoder layer stands for all:
the profile loads the model's last layer with the final norm and LM head (a one-layer last
stage, through the StageModel API) and the embedding table, and times them over a small grid
of steps: a few seconds at most, and no more memory than one layer, the head and a scratch KV
cache for `max_seqs_per_step` sequences of the longest context.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tandem.core.cpus import current_placement
from tandem.core.modeling.attention import AttentionMetadata, SequenceSlice
from tandem.core.modeling.model import StageModel
from tandem.core.modeling.model_config import ModelConfig
from tandem.core.modeling.profile import StageProfile
from tandem.core.modeling.stages import LayerRange
from tandem.core.modeling.weights import CheckpointIndex

BLOCK_SIZE = 16


EVICT_BYTES = 256 << 20  # more than any CPU's last-level cache here: touched before each timed run


@dataclass(frozen=True)
class Grid:
    """The points a profile measures and how often."""

    tokens: tuple[int, ...] = (1, 8, 32, 128, 512)
    contexts: tuple[int, ...] = (128, 1024)
    max_seqs_per_step: int = 32
    repeats: int = 5
    budget_s: float = 5.0  # past this, each remaining point runs once, without a warm-up

    def fitted(self, max_context: int) -> Grid:
        """The grid with contexts no longer than the model's positions (the longest kept, clipped)."""
        contexts = sorted({min(c, max_context) for c in self.contexts})
        return Grid(self.tokens, tuple(contexts), self.max_seqs_per_step, self.repeats, self.budget_s)


@torch.inference_mode()
def measure_profile(model_dir: str | Path, device: str = "cpu", dtype: str = "auto", grid: Grid = Grid(),
                    config: ModelConfig | None = None) -> StageProfile:
    """Time one decoder layer, the LM head and the embedding of the model at `model_dir`."""
    t_start = time.perf_counter()
    config = config or ModelConfig.from_dir(model_dir)
    dev = torch.device(device)
    n = config.num_hidden_layers
    grid = grid.fitted(config.max_position_embeddings)
    model = StageModel.load(model_dir, LayerRange(n - 1, n, n), dev, dtype, config)
    torch_dtype = next(model.parameters()).dtype
    embedding = _embedding_table(model_dir, config, dev, torch_dtype)
    max_blocks = -(-max(grid.contexts) // BLOCK_SIZE)
    cache = model.new_kv_cache(grid.max_seqs_per_step * max_blocks, BLOCK_SIZE)
    timer = _Timer(dev, grid, t_start)
    layer_ms, head_ms, embed_ms = [], [], []
    for tokens in grid.tokens:
        num_seqs = max(1, min(tokens, grid.max_seqs_per_step))
        ids = torch.randint(0, config.vocab_size, (tokens,), device=dev)
        hidden = torch.randn(tokens, config.hidden_size, device=dev, dtype=torch_dtype)
        row = []
        for context in grid.contexts:
            meta = step_metadata(tokens, num_seqs, context, max_blocks, dev, config.sliding_window)
            if n == 1:  # a one-layer model's only stage is also the first: it takes token ids
                row.append(timer.best_ms(lambda: model(ids, meta, cache)))
            else:
                row.append(timer.best_ms(lambda: model(hidden, meta, cache)))
        layer_ms.append(tuple(row))
        head_ms.append(timer.best_ms(lambda: model.compute_logits(hidden, meta)))
        embed_ms.append(timer.best_ms(lambda: F.embedding(ids, embedding)))
    placement = current_placement()
    return StageProfile(
        model=Path(model_dir).name, num_layers=n, hidden_size=config.hidden_size, vocab_size=config.vocab_size,
        device=dev.type, dtype=str(torch_dtype).removeprefix("torch."), num_threads=placement.num_threads,
        cpus=placement.cpus, max_seqs_per_step=grid.max_seqs_per_step, repeats=grid.repeats,
        tokens=grid.tokens, contexts=grid.contexts, layer_ms=tuple(layer_ms), head_ms=tuple(head_ms),
        embed_ms=tuple(embed_ms), measure_s=round(time.perf_counter() - t_start, 3))


def _embedding_table(model_dir: str | Path, config: ModelConfig, device: torch.device,
                     dtype: torch.dtype) -> torch.Tensor:
    """The [vocab, hidden] embedding table (a lookup's time depends only on its shape and dtype)."""
    name = "model.embed_tokens.weight"
    table = CheckpointIndex(model_dir).load({name: (config.vocab_size, config.hidden_size)})[name]
    return table.to(device=device, dtype=dtype)


def step_metadata(tokens: int, num_seqs: int, context: int, max_blocks: int, device: torch.device,
                   sliding_window: int | None) -> AttentionMetadata:
    """`tokens` new tokens shared evenly by `num_seqs` sequences, each `context` tokens long after
    the step (or as long as its new tokens, when they are more), in blocks of its own."""
    base, extra = divmod(tokens, num_seqs)
    slices = []
    for i in range(num_seqs):
        new = base + (1 if i < extra else 0)
        length = max(context, new)
        blocks = list(range(i * max_blocks, i * max_blocks + -(-length // BLOCK_SIZE)))
        slices.append(SequenceSlice(length - new, new, blocks))
    return AttentionMetadata.build(slices, BLOCK_SIZE, device, sliding_window)


class _Timer:
    """The fastest wall time of a call, with a warm-up, within the grid's time budget: other work
    on the core only ever slows a run down. On CPU each run starts with the caches holding none
    of the weights, as in a stage, where the layers before evict a layer's weights (one layer
    timed again and again would stay in cache and read up to a third faster, which split the
    mid model [7] | [1] + LM head instead of [6] | [2] + LM head)."""

    def __init__(self, device: torch.device, grid: Grid, t_start: float):
        self.device, self.grid, self.t_start = device, grid, t_start
        self._evict = torch.zeros(EVICT_BYTES // 4) if device.type == "cpu" else None

    def best_ms(self, call: Callable[[], object]) -> float:
        over_budget = time.perf_counter() - self.t_start > self.grid.budget_s
        if not over_budget:
            call()
        runs = [self._run(call) for _ in range(1 if over_budget else self.grid.repeats)]
        return round(min(runs), 4)

    def _run(self, call: Callable[[], object]) -> float:
        if self._evict is not None:
            self._evict.add_(1.0)  # read and write more than the last-level cache holds
        self._sync()
        t0 = time.perf_counter_ns()
        call()
        self._sync()
        return (time.perf_counter_ns() - t0) / 1e6

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def grid_of(tokens: Sequence[int], contexts: Sequence[int], repeats: int, budget_s: float) -> Grid:
    """A Grid from command-line values (sorted, without repeats)."""
    return Grid(tuple(sorted(set(tokens))), tuple(sorted(set(contexts))), Grid.max_seqs_per_step, repeats, budget_s)
