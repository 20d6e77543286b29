"""All stages of a model in one process, run stage after stage: the engine behind the
in-process demo and the reference the split model is tested with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tandem.core.block_pool import BlockPool
from tandem.core.modeling.attention import AttentionMetadata, SequenceSlice
from tandem.core.modeling.cuda_graphs import DecodeGraphs
from tandem.core.modeling.model import StageModel
from tandem.core.modeling.model_config import ModelConfig
from tandem.core.modeling.stages import plan_stages

# (logits [B, vocab], step) -> token ids [B]
SampleFn = Callable[[torch.Tensor, int], torch.Tensor]


def greedy(logits: torch.Tensor, step: int) -> torch.Tensor:
    return logits.argmax(dim=-1)


@dataclass
class _Sequence:
    token_ids: list[int]
    num_prompt_tokens: int
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    is_finished: bool = False

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]


@dataclass
class Generation:
    """Output of `LocalPipeline.generate`, one entry per prompt."""

    output_ids: list[list[int]]
    logits: list[torch.Tensor]  # per prompt [num_output_tokens, vocab] float32, when asked for


class LocalPipeline:
    """Loads each stage separately (only its own tensors) and chains them in process."""

    def __init__(
        self,
        model_dir: str | Path,
        num_stages: int = 1,
        stage_boundaries: Sequence[int] | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        num_blocks: int = 256,
        block_size: int = 16,
        decode_graphs: bool = False,
        graph_max_batch: int = 64,
    ):
        """`decode_graphs`: run decode steps through core.cuda_graphs (captured on CUDA, the same
        padded path run eagerly elsewhere)."""
        self.config = ModelConfig.from_dir(model_dir)
        self.device = torch.device(device)
        self.block_size = block_size
        self.layer_ranges = plan_stages(self.config.num_hidden_layers, num_stages, stage_boundaries)
        self.stages = [StageModel.load(model_dir, r, self.device, dtype, self.config) for r in self.layer_ranges]
        spare = 1 if decode_graphs else 0  # the graphs' spare block, never handed out
        self.kv_caches = [s.new_kv_cache(num_blocks + spare, block_size) for s in self.stages]
        self.allocator = BlockPool(num_blocks, block_size, prefix_caching=False)
        self.graphs = [DecodeGraphs(s, c, graph_max_batch, self.config.max_position_embeddings,
                                    capture=self.device.type == "cuda")
                       for s, c in zip(self.stages, self.kv_caches)] if decode_graphs else []

    def step(self, slices: Sequence[SequenceSlice], input_ids: torch.Tensor) -> torch.Tensor:
        """Run one batched step through every stage -> logits [B, vocab] of each sequence's last token."""
        meta = AttentionMetadata.build(slices, self.block_size, self.device, self.config.sliding_window)
        x = input_ids.to(self.device)
        for i, (stage, cache) in enumerate(zip(self.stages, self.kv_caches)):
            out = self.graphs[i].run(x, meta) if self.graphs else None
            x = stage(x, meta, cache) if out is None else out
        return self.stages[-1].compute_logits(x, meta)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sample: SampleFn = greedy,
        stop_token_ids: Sequence[int] | None = None,
        keep_logits: bool = False,
        on_tokens: Callable[[list[int | None]], None] | None = None,
    ) -> Generation:
        """Batched prefill of all prompts, then batched decode until each stops.

        `stop_token_ids` defaults to the model's EOS ids; pass () to ignore EOS.
        `on_tokens` receives, after every step, the new token of each prompt (None once finished).
        """
        stops = set(self.config.eos_token_ids if stop_token_ids is None else stop_token_ids)
        seqs = [_Sequence(list(p), len(p)) for p in prompts]
        try:
            step = 0
            while active := [s for s in seqs if not s.is_finished]:
                slices = [self._schedule(s) for s in active]
                new_ids = [t for s in active for t in s.token_ids[s.num_computed_tokens :]]
                logits = self.step(slices, torch.tensor(new_ids, dtype=torch.int64))
                tokens = sample(logits, step).tolist()
                for s, row, tok in zip(active, logits, tokens):
                    s.num_computed_tokens = len(s.token_ids)
                    s.token_ids.append(tok)
                    if keep_logits:
                        s.logits.append(row.cpu())
                    s.is_finished = tok in stops or len(s.output_ids) >= max_new_tokens
                if on_tokens:
                    fresh = {id(s): t for s, t in zip(active, tokens)}
                    on_tokens([fresh.get(id(s)) for s in seqs])
                step += 1
        finally:
            for s in seqs:
                self.allocator.free(s.block_table)
        vocab = self.config.vocab_size
        return Generation(
            output_ids=[s.output_ids for s in seqs],
            logits=[torch.stack(s.logits) if s.logits else torch.empty(0, vocab) for s in seqs],
        )

    def _schedule(self, seq: _Sequence) -> SequenceSlice:
        needed = -(-len(seq.token_ids) // self.block_size) - len(seq.block_table)
        if needed > 0:
            seq.block_table.extend(self.allocator.allocate(needed))
        return SequenceSlice(seq.num_computed_tokens, len(seq.token_ids) - seq.num_computed_tokens, seq.block_table)
