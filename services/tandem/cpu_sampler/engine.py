"""The sampler replica's domain: the sequences it holds and the sampling of logits frames.

Knows nothing of gRPC. One lock covers the sequence table and sampling, so a release racing
a frame either happens before the frame (the row is skipped) or after it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from tandem.core.errors import InvalidArgumentError
from tandem.core.sampling.fast import FastSampler
from tandem.core.sampling.reference import SequenceState, check_row, sample
from tandem.cpu_sampler.config import SamplerConfig
from tandem.v1 import common_pb2

log = logging.getLogger(__name__)

MAX_ERRORS_SHOWN = 4


@dataclass(frozen=True)
class SampledRow:
    """One sampled token of a frame."""

    request_id: str
    sample_index: int
    token_id: int
    logprobs: common_pb2.SampleLogprobs | None


@dataclass(frozen=True)
class FrameResult:
    """The tokens of one frame, in row order, without the rows that could not be sampled."""

    rows: list[SampledRow]
    error: str  # empty unless some rows were skipped: which and why
    sample_ns: int


class SamplerEngine:
    """Holds SequenceStates by request id and samples frames of logits rows for them.

    `vocab_size` comes from the replica's own configuration (the model's): a frame of another
    width is refused, never taken as the vocabulary; token ids are checked against it as
    sequences are added. `fast_sampler`
    picks FastSampler (same tokens and logprobs, much faster) over the reference `sample`;
    `num_threads` is the FastSampler's thread count.
    """

    def __init__(self, vocab_size: int, fast_sampler: bool = True, num_threads: int = 1):
        if vocab_size < 1:
            raise ValueError(f"vocab_size={vocab_size} must be >= 1")
        self._lock = threading.Lock()
        self._sequences: dict[str, SequenceState] = {}
        self._vocab_size = vocab_size
        self._fast = FastSampler(num_threads) if fast_sampler else None
        self.num_frames_total = 0
        self.num_rows_total = 0

    @classmethod
    def from_config(cls, config: SamplerConfig) -> SamplerEngine:
        return cls(config.vocabulary(), fast_sampler=config.fast_sampler, num_threads=config.num_threads)

    @property
    def fast_sampler(self) -> bool:
        """Whether frames go through FastSampler rather than the reference sampler."""
        return self._fast is not None

    def close(self) -> None:
        """Stop the sampler's worker threads, if it has any."""
        if self._fast:
            self._fast.close()

    @property
    def vocab_size(self) -> int:
        """The vocabulary size (logits frames are this wide)."""
        return self._vocab_size

    @property
    def num_sequences(self) -> int:
        return len(self._sequences)

    def add(self, states: Sequence[SequenceState]) -> None:
        """Take over these sequences (all or none); an id already held is replaced."""
        with self._lock:
            for state in states:
                state.check_vocab(self._vocab_size)
            for state in states:
                self._sequences[state.request_id] = state

    def release(self, request_ids: Iterable[str]) -> None:
        """Forget these sequences; unknown ids are ignored."""
        with self._lock:
            for request_id in request_ids:
                self._sequences.pop(request_id, None)

    def sample_frame(
        self, request_ids: Sequence[str], sample_indices: Sequence[int], logits: torch.Tensor
    ) -> FrameResult:
        """Sample logits [rows, vocab] float32, row i for request_ids[i] at sample_indices[i].

        A malformed frame raises InvalidArgumentError. Rows of unknown requests, and rows that
        cannot be sampled (gap in the indices, NaN logits), are skipped and named in `error`.
        """
        start_ns = time.perf_counter_ns()
        if logits.dim() != 2 or logits.dtype != torch.float32:
            raise InvalidArgumentError(
                f"logits must be a rank-2 [rows, vocab] float32 tensor, got shape "
                f"{list(logits.shape)} of {str(logits.dtype).removeprefix('torch.')}")
        num_rows, width = logits.shape
        if not num_rows == len(request_ids) == len(sample_indices):
            raise InvalidArgumentError(
                f"logits have {num_rows} rows but the frame has {len(request_ids)} request ids "
                f"and {len(sample_indices)} sample indices")
        with self._lock:
            self._check_width(width)
            tops = logits.amax(dim=1).tolist()  # each row's max (NaN if it holds one), in one pass
            rows, states, indices, problems = [], [], [], []
            for row, (request_id, index) in enumerate(zip(request_ids, sample_indices)):
                state = self._sequences.get(request_id)
                if state is None:
                    log.info("skipping row %d: request %r is not held (released?)", row, request_id)
                    problems.append(f"row {row}: unknown request {request_id!r}")
                    continue
                try:
                    check_row(logits[row], state, index, tops[row])
                except InvalidArgumentError as e:
                    log.warning("skipping row %d: %s", row, e)
                    problems.append(f"row {row}: {e}")
                    continue
                rows.append(row)
                states.append(state)
                indices.append(index)
            picked = logits[rows] if len(rows) < num_rows else logits  # [sampled rows, vocab]
            if self._fast:
                results = self._fast.sample(picked, states, indices, checked=True)
            else:
                results = sample(picked, states, indices)
            self.num_frames_total += 1
            self.num_rows_total += len(rows)
        sampled = [
            SampledRow(state.request_id, index, token, logprobs)
            for state, index, (token, logprobs) in zip(states, indices, results)
        ]
        return FrameResult(sampled, _summary(problems), time.perf_counter_ns() - start_ns)

    def _check_width(self, width: int) -> None:
        if width == 0:
            raise InvalidArgumentError("logits have 0 columns; the vocabulary cannot be empty")
        if width != self._vocab_size:
            raise InvalidArgumentError(
                f"logits have {width} columns, but the vocabulary has {self._vocab_size} tokens")


def _summary(problems: list[str]) -> str:
    if not problems:
        return ""
    shown = "; ".join(problems[:MAX_ERRORS_SHOWN])
    more = f"; and {len(problems) - MAX_ERRORS_SHOWN} more" if len(problems) > MAX_ERRORS_SHOWN else ""
    return f"{len(problems)} row(s) not sampled: {shown}{more}"
