"""Runs step plans on one stage: checks the plan, moves swapped blocks, computes. gRPC-free."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tandem.core.errors import ConfigError, InvalidArgumentError
from tandem.core.modeling.attention import AttentionMetadata, SequenceSlice
from tandem.core.modeling.cuda_graphs import DecodeGraphs
from tandem.core.modeling.model import StageModel
from tandem.core.modeling.model_config import ModelConfig
from tandem.core.modeling.profile import balanced_split, load_profile
from tandem.core.modeling.stages import plan_stages
from tandem.stage_worker.config import StageWorkerConfig
from tandem.stage_worker.tables import PlanTables
from tandem.v1 import stage_worker_pb2 as pb

# (request_id, tensor [n, layers, 2, block_size, kv_heads, head_dim]) -> None, and request_id -> tensor
PutBlocks = Callable[[str, torch.Tensor], None]
GetBlocks = Callable[[str], torch.Tensor]


@dataclass(frozen=True)
class StepInputs:
    """A plan turned into tensors, ready for the forward pass."""

    slices: list[SequenceSlice]
    meta: AttentionMetadata
    input_ids: torch.Tensor | None  # [T] token ids on stage 0 (a view of a slot buffer), else None
    samplers: list[str]  # host:port of each row's sampler, from the stream's sampler table
    hidden: torch.Tensor | None = None  # [T, hidden] device buffer the activations are copied into (GPU stages)
    ready: torch.cuda.Event | None = None  # GPU stages: recorded after the input copies, on the preparing stream
    # The last stage, when some rows are partial prefill chunks: [R] int64 on the device, the rows
    # that get logits (the others are not sampled); None: every row.
    logit_rows: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.slices)


@dataclass(frozen=True)
class StepOutput:
    hidden: torch.Tensor | None  # [T, hidden] for the next stage, or None on the last stage
    logits: torch.Tensor | None  # [R, vocab] float32 on the last stage: the rows that are not partial prefills


class StageExecutor:
    """`is_known_sampler`: on a stage that sends logits, whether its own configuration names a
    sampler address (PlanTables refuses plans naming any other)."""

    def __init__(self, config: StageWorkerConfig, is_known_sampler: Callable[[str], bool] | None = None):
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model)
        boundaries = stage_boundaries(config, self.model_config)
        ranges = plan_stages(self.model_config.num_hidden_layers, config.num_stages, boundaries or None)
        self.layers = ranges[config.stage_index]
        self.model = StageModel.load(config.model, self.layers, config.device, config.dtype, self.model_config)
        self.dtype = next(self.model.parameters()).dtype
        self.device = torch.device(config.device)
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and config.cuda_graphs:  # the cache's last block is the graphs' spare
            self.cache = self.model.new_kv_cache(config.num_blocks + 1, config.block_size)
            self.graphs = DecodeGraphs(self.model, self.cache, config.cuda_graph_max_batch,
                                       min(config.cuda_graph_max_context, self.model_config.max_position_embeddings))
        else:
            self.cache = self.model.new_kv_cache(config.num_blocks, config.block_size)
        # GPU stages copy a step's inputs on a stream of their own, so that they need not wait for
        # the step computing on the default stream (see stage_worker.inputs).
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.tables = PlanTables(config.num_blocks, is_known_sampler)  # written by the thread that prepares plans
        self.num_steps = 0

    @property
    def blocks_of(self) -> dict[str, list[int]]:
        """Live request -> its block table."""
        return self.tables.blocks_of

    @property
    def num_blocks_used(self) -> int:
        return len({b for table in list(self.blocks_of.values()) for b in table})

    def check_plan(self, plan: pb.StepPlan, block_tables: list[list[int]]) -> list[SequenceSlice]:
        """The plan's sequences as slices, after checking ids and positions."""
        if not plan.sequences:
            raise InvalidArgumentError(f"step {plan.step_id}: plan has no sequences")
        vocab, max_len = self.model_config.vocab_size, self.model_config.max_position_embeddings
        chained = plan.input_step_id != 0  # one token a sequence, sampled at step input_step_id
        if chained and plan.input_step_id >= plan.step_id:
            raise InvalidArgumentError(f"step {plan.step_id}: input_step_id {plan.input_step_id} is not an earlier step")
        slices = []
        for s, table in zip(plan.sequences, block_tables, strict=True):
            if chained and (s.input_ids or s.is_partial_prefill):
                raise InvalidArgumentError(f"step {plan.step_id}: request {s.request_id!r} has input tokens or a "
                                           "prefill chunk in a chained step")
            if not chained and not s.input_ids:
                raise InvalidArgumentError(f"step {plan.step_id}: request {s.request_id!r} has no input tokens")
            if self.layers.is_first and not all(0 <= t < vocab for t in s.input_ids):
                raise InvalidArgumentError(f"step {plan.step_id}: request {s.request_id!r} has token ids outside [0, {vocab})")
            num_new = 1 if chained else len(s.input_ids)
            if s.num_computed_tokens + num_new > max_len:
                raise InvalidArgumentError(f"step {plan.step_id}: request {s.request_id!r} exceeds {max_len} positions")
            slices.append(SequenceSlice(s.num_computed_tokens, num_new, table))
        return slices

    def swap_out(self, plan: pb.StepPlan, put: PutBlocks) -> None:
        for t in plan.swap_out:
            self.tables.check_block_ids(plan.step_id, t.block_ids)
            ids = torch.tensor(list(t.block_ids), dtype=torch.int64, device=self.device)
            put(t.request_id, self.cache.read_blocks(ids).cpu())

    def swap_in(self, plan: pb.StepPlan, get: GetBlocks) -> None:
        for t in plan.swap_in:
            self.tables.check_block_ids(plan.step_id, t.block_ids)
            blocks = get(t.request_id)  # [n, layers, 2, block_size, kv_heads, head_dim]
            expected = (len(t.block_ids), *self.cache.block_shape)
            if tuple(blocks.shape) != expected:
                raise InvalidArgumentError(f"swap-in of {t.request_id!r}: got blocks {list(blocks.shape)}, expected {list(expected)}")
            ids = torch.tensor(list(t.block_ids), dtype=torch.int64, device=self.device)
            self.cache.write_blocks(ids, blocks)

    def prepare(self, plan: pb.StepPlan, buffers: dict[str, torch.Tensor]) -> StepInputs | None:
        """Take a plan's table changes (plans come here in the order sent), check it and build its
        input tensors; token ids go into `buffers` (one slot's, reused across steps: see
        stage_worker.inputs). None for a plan without sequences."""
        resolved = self.tables.apply(plan)
        if not plan.sequences:
            return None
        slices = self.check_plan(plan, resolved.block_tables)
        if self._copy_stream is None:
            return self._prepare(plan, slices, resolved.samplers, buffers)
        with torch.cuda.stream(self._copy_stream):
            inputs = self._prepare(plan, slices, resolved.samplers, buffers)
            ready = torch.cuda.Event()
            ready.record()
        return dataclasses.replace(inputs, ready=ready)

    def _prepare(self, plan: pb.StepPlan, slices: list[SequenceSlice], samplers: list[str],
                 buffers: dict[str, torch.Tensor]) -> StepInputs:
        meta = AttentionMetadata.build(slices, self.config.block_size, self.device, self.model_config.sliding_window)
        input_ids = hidden = None
        if self.layers.is_first:  # a chained step's tokens come later (fill_input_ids)
            ids = (torch.zeros(len(plan.sequences), dtype=torch.int64) if plan.input_step_id else
                   torch.tensor([t for s in plan.sequences for t in s.input_ids], dtype=torch.int64))
            input_ids = _slot_buffer(buffers, "input_ids", (ids.numel(),), torch.int64, self.device)
            input_ids.copy_(ids.pin_memory() if self._copy_stream else ids, non_blocking=True)
        elif self.device.type != "cpu":  # activations arrive in host memory: ready their device buffer
            shape = (sum(s.num_new_tokens for s in slices), self.model_config.hidden_size)
            hidden = _slot_buffer(buffers, "hidden", shape, self.dtype, self.device)
        logit_rows = None
        if self.layers.is_last and any(s.is_partial_prefill for s in plan.sequences):
            rows = [i for i, s in enumerate(plan.sequences) if not s.is_partial_prefill]
            logit_rows = torch.tensor(rows, dtype=torch.int64, device=self.device)
        return StepInputs(slices, meta, input_ids, samplers, hidden, logit_rows=logit_rows)

    def fill_input_ids(self, inputs: StepInputs, token_ids: list[int]) -> None:
        """Stage 0, a chained step: its tokens, one a sequence in plan order, which came after its
        inputs were prepared."""
        vocab = self.model_config.vocab_size
        if not all(0 <= t < vocab for t in token_ids):
            raise InvalidArgumentError(f"chained tokens outside [0, {vocab}): {token_ids}")
        inputs.input_ids.copy_(torch.tensor(token_ids, dtype=torch.int64))

    def run(self, plan: pb.StepPlan, inputs: StepInputs, hidden: torch.Tensor | None) -> StepOutput:
        """Compute one step. `hidden` is [T, hidden_size] from the previous stage (None on stage 0)."""
        num_tokens = inputs.num_tokens
        if inputs.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(inputs.ready)
        if self.layers.is_first:
            x = inputs.input_ids
        else:
            expected = (num_tokens, self.model_config.hidden_size)
            if hidden is None or tuple(hidden.shape) != expected:
                got = None if hidden is None else list(hidden.shape)
                raise InvalidArgumentError(f"step {plan.step_id}: activations {got}, plan needs {list(expected)}")
            x = inputs.hidden.copy_(hidden) if inputs.hidden is not None else hidden.to(self.dtype)
        meta = inputs.meta
        out = self.graphs.run(x, meta) if self.graphs is not None else None
        if out is None:
            out = self.model(x, meta, self.cache)
        self.num_steps += 1
        if self.layers.is_last:
            logits = self.model.compute_logits(out, meta, inputs.logit_rows)
            return StepOutput(hidden=None, logits=self._to_host(logits))
        return StepOutput(hidden=self._to_host(out), logits=None)

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` in host memory; from a GPU through pinned memory, which the copy engine reads
        and writes directly (a pageable destination takes a staging copy on the way). The thread
        sleeps until the copy is done instead of spinning on a core the stage's other threads need."""
        if tensor.device.type == "cpu":
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        done = torch.cuda.Event(blocking=True)
        done.record()
        done.synchronize()
        return host


def stage_boundaries(config: StageWorkerConfig, model: ModelConfig) -> tuple[int, ...]:
    """The configured boundaries; with `auto`, the balanced split of the configured profile."""
    if not isinstance(config.stage_boundaries, str):  # validate(): a str is AUTO
        return tuple(config.stage_boundaries)
    profile = load_profile(config.stage_profile)
    if profile.num_layers != model.num_hidden_layers:
        raise ConfigError(f"config field 'stage_profile': {config.stage_profile} was measured on a model of "
                          f"{profile.num_layers} layers, {config.model} has {model.num_hidden_layers}")
    return balanced_split(profile, config.num_stages).boundaries


def _slot_buffer(buffers: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """A view of shape `shape` into the slot's buffer `name`, grown when too small and reused."""
    numel = math.prod(shape)
    buffer = buffers.get(name)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[name] = torch.empty(max(numel, 256), dtype=dtype, device=device)
    return buffer[:numel].view(shape)
